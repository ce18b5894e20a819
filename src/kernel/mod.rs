//! The Jupyter wire protocol (v5.3) client: connection info, HMAC-SHA256 signing, framing,
//! typed messages, the five channels and the heartbeat. Knows nothing of Docker or HTTP.

pub mod client;
pub mod codec;
pub mod connection;
pub mod content;
pub mod message;
pub mod signer;

pub use client::{
    ClientOptions, DEFAULT_MAX_MESSAGE_SIZE, Incoming, KernelClient, KernelError, WireFault,
};
pub use codec::CodecError;
pub use connection::{ConnectionInfo, Transport};
pub use content::{Content, ContentError};
pub use message::{Channel, Header, Message};
pub use signer::{Signer, SignerError};
