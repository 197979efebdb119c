//! Appending arbitrary bytes returns Ok or Err, never panics, and never changes the log
//! unless it returned Ok.
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(dir) = tempfile::tempdir() else { return };
    let Ok((mut log, _)) = ferrite_storage::PartitionLog::open(dir.path(), Default::default(), true) else { return };
    let before = log.log_end_offset();
    if log.append(data, 0, 0).is_err() {
        assert_eq!(log.log_end_offset(), before);
        assert_eq!(log.size_bytes(), 0);
    }
});
