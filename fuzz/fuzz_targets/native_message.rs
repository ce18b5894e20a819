//! The native WebSocket protocol's parser on arbitrary text: a message or an error, never a
//! panic.
#![no_main]

use kernelbox::api::native::protocol::ClientMessage;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = serde_json::from_slice::<ClientMessage>(data);
});
