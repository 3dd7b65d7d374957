//! Any bytes as a redo log: no panic; every record the scan accepts re-encodes to the
//! very bytes it came from; a torn tail starts at a bad record; a preallocated end has
//! only zeros after it.
//! The same bytes as a checkpoint: no panic, and a load that succeeds saw every entry.
#![no_main]

use dds::log::checkpoint;
use dds::log::record::{decode, encode, scan, ScanEnd};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let mut at = 0usize;
    let result = scan(data, |record| {
        let mut again = Vec::new();
        encode(&mut again, record.lsn, &record.mutation);
        assert_eq!(&data[at..at + again.len()], &again[..], "re-encoding changed a record");
        at += again.len();
    });
    match result {
        Ok(ScanEnd::Clean) => assert_eq!(at, data.len()),
        Ok(ScanEnd::Preallocated { offset }) => {
            assert_eq!(offset as usize, at);
            assert!(data[at..].iter().all(|&b| b == 0), "a preallocated end with bytes after it");
        }
        Ok(ScanEnd::TornTail { offset, .. }) => {
            assert_eq!(offset as usize, at);
            assert!(decode(&data[at..], offset).is_err());
        }
        Err(e) => assert!(e.offset() as usize >= at),
    }
    let (mut puts, mut decisions) = (0u64, 0u64);
    if checkpoint::load(data, |_, _| puts += 1, |_| decisions += 1).is_ok() {
        assert_eq!(puts + decisions, u64::from_le_bytes(data[16..24].try_into().unwrap()));
    }
});
