//! Frames ⇄ [`Message`](super::Message): `<IDS|MSG>` framing, identities and buffers kept; every
//! malformed input is an error, never a panic. (skeleton; the wire-client work fills it in)
