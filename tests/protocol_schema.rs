//! The checked-in JSON Schema of the native protocol matches the Rust types.

#[test]
fn checked_in_schema_matches_the_rust_types() {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/protocol/native.schema.json");
    let checked_in = std::fs::read_to_string(path).expect("protocol/native.schema.json exists");
    let generated = kernelbox::api::native::protocol::schema_text();
    assert!(
        checked_in == generated,
        "protocol/native.schema.json is stale: run `cargo run -- schema --out protocol/native.schema.json`"
    );
}
