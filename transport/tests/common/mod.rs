//! What the transport tests share: a 4-byte length-prefixed framing.
#![allow(dead_code)]

use dds_transport::Framing;

pub const FRAME_MAX: usize = 8 << 20;

pub struct LenPrefix;

impl Framing for LenPrefix {
    fn frame_len(&self, buf: &[u8]) -> Result<Option<usize>, String> {
        let Some(h) = buf.get(..4) else { return Ok(None) };
        let len = u32::from_le_bytes(h.try_into().unwrap()) as usize + 4;
        if len > FRAME_MAX {
            return Err(format!("frame of {len} bytes is too long"));
        }
        Ok(Some(len))
    }
}

pub fn frame(payload: &[u8]) -> Vec<u8> {
    let mut f = (payload.len() as u32).to_le_bytes().to_vec();
    f.extend_from_slice(payload);
    f
}
pub mod tap;
