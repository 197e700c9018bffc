fn main() -> Result<(), Box<dyn std::error::Error>> {
    println!("cargo:rerun-if-changed=proto");
    // protox compiles the .proto files in Rust: no protoc needed on a fresh machine.
    let fds = protox::compile(["replica.proto", "engine.proto"], ["proto"])?;
    tonic_prost_build::configure()
        // Block payloads are handed around without copying.
        .bytes(".")
        .compile_fds(fds)?;
    Ok(())
}
