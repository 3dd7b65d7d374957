use super::*;
use proptest::prelude::*;

fn arb_kind() -> impl Strategy<Value = Kind> {
    let op = prop::sample::select(Op::ALL.to_vec());
    let status = prop::sample::select(Status::ALL.to_vec());
    prop_oneof![op.clone().prop_map(Kind::Request), (op, status).prop_map(|(o, s)| Kind::Reply(o, s))]
}

fn valid_frame() -> impl Strategy<Value = (Kind, u64, u64, Vec<u8>, Vec<u8>)> {
    (arb_kind(), any::<u64>(), any::<u64>(), prop::collection::vec(any::<u8>(), 0..64), prop::collection::vec(any::<u8>(), 0..300))
        .prop_map(|(kind, id, epoch, mut key, mut value)| {
            match kind {
                Kind::Request(op) => {
                    if !op.request_has_key() {
                        key.clear();
                    }
                    if !op.request_has_value() {
                        value.clear();
                    }
                }
                Kind::Reply(..) => key.clear(),
            }
            (kind, id, epoch, key, value)
        })
}

proptest! {
    #[test]
    fn round_trip((kind, request_id, epoch, key, value) in valid_frame(), trailing in prop::collection::vec(any::<u8>(), 0..40)) {
        let frame = Frame { kind, request_id, epoch, key: &key, value: &value };
        let mut buf = Vec::new();
        encode(&mut buf, &frame);
        prop_assert_eq!(buf.len(), HEADER_LEN + key.len() + value.len());
        prop_assert_eq!(frame_len(&buf).unwrap(), Some(buf.len()));
        let encoded_len = buf.len();
        buf.extend_from_slice(&trailing);
        let (decoded, used) = decode(&buf).unwrap().unwrap();
        prop_assert_eq!(used, encoded_len);
        prop_assert_eq!(decoded, frame);
    }

    #[test]
    fn every_prefix_asks_for_more((kind, request_id, epoch, key, value) in valid_frame()) {
        let mut buf = Vec::new();
        encode(&mut buf, &Frame { kind, request_id, epoch, key: &key, value: &value });
        for cut in 0..buf.len() {
            prop_assert_eq!(decode(&buf[..cut]).unwrap(), None);
        }
    }

    #[test]
    fn arbitrary_bytes_never_panic(bytes in prop::collection::vec(any::<u8>(), 0..200)) {
        let _ = decode(&bytes);
        let _ = BrickInfo::decode(&bytes);
        let _ = CoreStats::decode(&bytes);
    }

    #[test]
    fn brick_info_round_trip(bits in 0u8..=16, ports in prop::collection::vec(any::<u16>(), 1..64), core_seed in any::<u16>()) {
        let info = BrickInfo { partition_bits: bits, core: core_seed % ports.len() as u16, ports };
        let mut buf = Vec::new();
        info.encode(&mut buf);
        prop_assert_eq!(BrickInfo::decode(&buf).unwrap(), info);
    }
}

fn header(op: u8, status: u8, flags: u8, key_len: u16, value_len: u32) -> Vec<u8> {
    let mut h = Vec::new();
    h.extend_from_slice(&MAGIC.to_le_bytes());
    h.push(VERSION);
    h.push(op);
    h.push(status);
    h.push(flags);
    h.extend_from_slice(&key_len.to_le_bytes());
    h.extend_from_slice(&7u64.to_le_bytes());
    h.extend_from_slice(&0u64.to_le_bytes());
    h.extend_from_slice(&value_len.to_le_bytes());
    h
}

#[test]
fn each_malformed_header_has_its_error() {
    let mut bad_magic = header(1, 0, 0, 1, 0);
    bad_magic[0] = b'G';
    assert!(matches!(decode(&bad_magic), Err(DecodeError::BadMagic { .. })));
    let mut bad_version = header(1, 0, 0, 1, 0);
    bad_version[2] = 9;
    assert_eq!(decode(&bad_version), Err(DecodeError::BadVersion { found: 9 }));
    assert_eq!(decode(&header(0x30, 0, 0, 0, 0)), Err(DecodeError::UnknownOp { found: 0x30 }));
    assert_eq!(decode(&header(0x81, 77, 0, 0, 0)), Err(DecodeError::UnknownStatus { found: 77 }));
    assert_eq!(decode(&header(1, 1, 0, 1, 0)), Err(DecodeError::StatusOnRequest { found: 1 }));
    assert_eq!(decode(&header(1, 0, 4, 1, 0)), Err(DecodeError::ReservedFlags { found: 4 }));
    assert_eq!(decode(&header(1, 0, 0, 5000, 0)), Err(DecodeError::KeyTooLong { len: 5000 }));
    assert_eq!(decode(&header(2, 0, 0, 1, u32::MAX)), Err(DecodeError::ValueTooLong { len: u32::MAX as usize }));
    assert!(matches!(decode(&header(1, 0, 0, 1, 3)), Err(DecodeError::UnexpectedValue { .. })));
    assert!(matches!(decode(&header(4, 0, 0, 2, 0)), Err(DecodeError::UnexpectedKey { .. })));
    assert!(matches!(decode(&header(0x81, 0, 0, 2, 0)), Err(DecodeError::UnexpectedKey { .. })));
}

#[test]
fn decode_exact_rejects_short_and_long_buffers() {
    let mut buf = Vec::new();
    encode(&mut buf, &Frame { kind: Kind::Request(Op::Put), request_id: 1, epoch: 0, key: b"k", value: b"v" });
    assert!(decode_exact(&buf).is_ok());
    assert!(matches!(decode_exact(&buf[..buf.len() - 1]), Err(DecodeError::LengthMismatch { .. })));
    buf.push(0);
    assert!(matches!(decode_exact(&buf), Err(DecodeError::LengthMismatch { .. })));
}
