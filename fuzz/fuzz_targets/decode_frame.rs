//! Any bytes into the frame decoder (and the payload decoders: hello, stats, txid,
//! prepare, chunk, snapshot request, and a catch-up's digests, diff and buckets): no panic, and whatever decodes re-encodes to the very bytes it came
//! from.
#![no_main]

use dds::proto::catchup::decode_digest_reply;
use dds::proto::{decode, encode, frame_len, BrickInfo, Buckets, Chunk, CoreStats, DiffRequest, DigestRequest, PrepareBody, SnapshotRequest, TxId};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let len = frame_len(data);
    match decode(data) {
        Ok(Some((frame, used))) => {
            assert_eq!(len, Ok(Some(used)));
            let mut again = Vec::new();
            encode(&mut again, &frame);
            assert_eq!(&again[..], &data[..used], "re-encoding changed the frame");
            let _ = BrickInfo::decode(frame.value);
            let _ = CoreStats::decode(frame.value);
            let _ = TxId::decode(frame.value);
            if let Ok(body) = PrepareBody::decode(frame.value) {
                // What decodes writes back to the very bytes.
                let mut again = Vec::new();
                body.write(&mut again);
                assert_eq!(&again[..], frame.value);
            }
            if let Ok(chunk) = Chunk::decode(frame.value) {
                let _ = chunk.entries().count();
            }
            if let Ok(req) = SnapshotRequest::decode(frame.value) {
                assert_eq!(&req.to_bytes()[..], frame.value);
            }
            if let Ok(req) = DigestRequest::decode(frame.value) {
                assert_eq!(&req.to_bytes()[..], frame.value);
            }
            if let Ok(req) = DiffRequest::decode(frame.value) {
                assert_eq!(&req.to_bytes()[..], frame.value);
            }
            let _ = decode_digest_reply(frame.value);
            if let Ok(b) = Buckets::decode(frame.value) {
                let _ = (b.buckets().count(), b.entries().count());
            }
        }
        Ok(None) => assert!(matches!(len, Ok(None)) || len.unwrap().unwrap() > data.len()),
        Err(e) => assert_eq!(len, Err(e)),
    }
});
