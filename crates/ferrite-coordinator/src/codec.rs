//! The primitive types of Kafka's generated message schemas, as the records of
//! `__consumer_offsets` and `__transaction_state` use them: big-endian integers,
//! int16-length strings and int32-length bytes (non-flexible versions), and the KIP-482
//! compact forms with unsigned varint lengths plus tagged fields (flexible versions).

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CodecError {
    #[error("record truncated at byte {0}")]
    Truncated(usize),
    #[error("invalid length {0}")]
    Length(i64),
    #[error("string is not UTF-8")]
    Utf8,
    #[error("{0} trailing bytes after the record")]
    Trailing(usize),
}

pub type CodecResult<T> = Result<T, CodecError>;

pub struct Reader<'a> {
    buf: &'a [u8],
    pos: usize,
}

impl<'a> Reader<'a> {
    pub fn new(buf: &'a [u8]) -> Self {
        Reader { buf, pos: 0 }
    }
    pub fn take(&mut self, n: usize) -> CodecResult<&'a [u8]> {
        let end = self
            .pos
            .checked_add(n)
            .ok_or(CodecError::Truncated(self.pos))?;
        let s = self
            .buf
            .get(self.pos..end)
            .ok_or(CodecError::Truncated(self.pos))?;
        self.pos = end;
        Ok(s)
    }
    fn array<const N: usize>(&mut self) -> CodecResult<[u8; N]> {
        let mut a = [0u8; N];
        a.copy_from_slice(self.take(N)?);
        Ok(a)
    }
    pub fn i8(&mut self) -> CodecResult<i8> {
        Ok(i8::from_be_bytes(self.array()?))
    }
    pub fn i16(&mut self) -> CodecResult<i16> {
        Ok(i16::from_be_bytes(self.array()?))
    }
    pub fn i32(&mut self) -> CodecResult<i32> {
        Ok(i32::from_be_bytes(self.array()?))
    }
    pub fn i64(&mut self) -> CodecResult<i64> {
        Ok(i64::from_be_bytes(self.array()?))
    }
    pub fn uvarint(&mut self) -> CodecResult<u32> {
        let mut v: u32 = 0;
        for shift in (0..35).step_by(7) {
            let b = self.i8()? as u8;
            v |= u32::from(b & 0x7f) << shift;
            if b & 0x80 == 0 {
                return Ok(v);
            }
        }
        Err(CodecError::Length(-1))
    }
    pub fn string_bytes(&mut self, len: usize) -> CodecResult<String> {
        let b = self.take(len)?;
        String::from_utf8(b.to_vec()).map_err(|_| CodecError::Utf8)
    }
    /// `string` (int16 length; -1 is null).
    pub fn nullable_string(&mut self) -> CodecResult<Option<String>> {
        let n = self.i16()?;
        if n == -1 {
            return Ok(None);
        }
        let n = usize::try_from(n).map_err(|_| CodecError::Length(n.into()))?;
        self.string_bytes(n).map(Some)
    }
    pub fn string(&mut self) -> CodecResult<String> {
        self.nullable_string()?.ok_or(CodecError::Length(-1))
    }
    /// `bytes` (int32 length; -1 is null, read as empty).
    pub fn bytes(&mut self) -> CodecResult<Vec<u8>> {
        let n = self.i32()?;
        if n == -1 {
            return Ok(Vec::new());
        }
        let n = usize::try_from(n).map_err(|_| CodecError::Length(n.into()))?;
        Ok(self.take(n)?.to_vec())
    }
    /// The length of a compact string, bytes or array (unsigned varint N+1; 0 is null).
    pub fn compact_len(&mut self) -> CodecResult<Option<usize>> {
        Ok((self.uvarint()? as usize).checked_sub(1))
    }
    pub fn compact_nullable_string(&mut self) -> CodecResult<Option<String>> {
        match self.compact_len()? {
            None => Ok(None),
            Some(n) => self.string_bytes(n).map(Some),
        }
    }
    pub fn compact_string(&mut self) -> CodecResult<String> {
        self.compact_nullable_string()?
            .ok_or(CodecError::Length(-1))
    }
    pub fn compact_bytes(&mut self) -> CodecResult<Vec<u8>> {
        match self.compact_len()? {
            None => Ok(Vec::new()),
            Some(n) => Ok(self.take(n)?.to_vec()),
        }
    }
    pub fn remaining(&self) -> usize {
        self.buf.len() - self.pos
    }
    pub fn finish(&self) -> CodecResult<()> {
        match self.remaining() {
            0 => Ok(()),
            n => Err(CodecError::Trailing(n)),
        }
    }
}

/// Skips a tagged-field section whose fields the reader does not know (the schemas'
/// compatibility rule for unknown tags).
pub fn skip_tagged(r: &mut Reader<'_>) -> CodecResult<()> {
    let n = r.uvarint()?;
    for _ in 0..n {
        r.uvarint()?;
        let size = r.uvarint()? as usize;
        r.take(size)?;
    }
    Ok(())
}

pub fn put_uvarint(out: &mut Vec<u8>, mut v: u32) {
    while v >= 0x80 {
        out.push((v as u8 & 0x7f) | 0x80);
        v >>= 7;
    }
    out.push(v as u8);
}

pub fn len_u32(n: usize) -> u32 {
    // Lengths are bounded by the coordinators' limits far below u32::MAX.
    u32::try_from(n).unwrap_or(u32::MAX)
}

/// `string` with an int16 length. Callers bound lengths to i16::MAX before (group ids,
/// topic names and metadata are limited far below it); a longer string is a bug.
pub fn put_string(out: &mut Vec<u8>, s: &str) {
    assert!(s.len() <= i16::MAX as usize, "string longer than int16");
    out.extend_from_slice(&(s.len() as i16).to_be_bytes());
    out.extend_from_slice(s.as_bytes());
}

pub fn put_nullable_string(out: &mut Vec<u8>, s: Option<&str>) {
    match s {
        None => out.extend_from_slice(&(-1i16).to_be_bytes()),
        Some(s) => put_string(out, s),
    }
}

pub fn put_bytes(out: &mut Vec<u8>, b: &[u8]) {
    let n = i32::try_from(b.len()).unwrap_or(i32::MAX);
    out.extend_from_slice(&n.to_be_bytes());
    out.extend_from_slice(b);
}
