//! No bytes may panic batch validation or the batch iterator.
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = ferrite_storage::validate_producer_batch(data);
    let _ = ferrite_storage::validate_batch(data);
    for item in ferrite_storage::BatchIter::new(data) {
        if item.is_err() {
            break;
        }
    }
});
