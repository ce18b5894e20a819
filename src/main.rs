//! The `kernelbox` command line.
fn main() {}
