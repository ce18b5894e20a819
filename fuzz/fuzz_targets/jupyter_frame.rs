//! The Jupyter WebSocket frame decoders (JSON text, legacy binary, v1 binary) on arbitrary
//! bytes: a message or an error, never a panic.
#![no_main]

use kernelbox::api::jupyter::wire;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(text) = std::str::from_utf8(data) {
        let _ = wire::decode_text(text);
    }
    let _ = wire::decode_v1(data);
    let _ = wire::decode_legacy_binary(data);
});
