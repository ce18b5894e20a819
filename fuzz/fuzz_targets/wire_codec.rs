//! The Jupyter wire codec on arbitrary ZeroMQ frames: every input is a message or a typed
//! error, never a panic. Frames are split at 0xFF bytes; half the runs sign with a key. The
//! input is also tried (in the keyed half of the runs) as the tail of a large content object, so
//! the scan that indexes large content sees it too.
#![no_main]

use bytes::Bytes;
use kernelbox::kernel::{Content, Signer};
use kernelbox::kernel::codec::{decode, encode};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let (keyed, rest) = match data.split_first() {
        Some((first, rest)) => (first & 1 == 1, rest),
        None => (false, data),
    };
    let Ok(signer) = Signer::new(if keyed { b"fuzz-key" } else { b"" }) else {
        return;
    };
    let frames: Vec<Bytes> = rest
        .split(|b| *b == 0xff)
        .map(Bytes::copy_from_slice)
        .collect();
    if let Ok(msg) = decode(frames, &signer) {
        // Whatever decodes re-encodes.
        let _ = encode(&msg, &signer);
    }
    if !keyed {
        return;
    }
    let mut large = format!("{{\"pad\":\"{}\",", "x".repeat(Content::INDEXED_FROM)).into_bytes();
    large.extend_from_slice(rest);
    if let Ok(content) = Content::from_frame(Bytes::from(large)) {
        // A field found by the index is valid JSON on its own.
        if let Some(text) = content.field_json("text") {
            assert!(serde_json::from_str::<serde_json::Value>(text).is_ok());
        }
    }
});
