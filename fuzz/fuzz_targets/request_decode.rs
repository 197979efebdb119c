//! No request frame may panic the decoder.
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = ferrite_protocol::decode_request(bytes::Bytes::copy_from_slice(data));
    if let Some(prefix) = data.get(..4) {
        let mut p = [0u8; 4];
        p.copy_from_slice(prefix);
        let _ = ferrite_protocol::frame_length(p, ferrite_protocol::REQUEST_BYTES_MAX_DEFAULT);
    }
});
