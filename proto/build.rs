fn main() -> Result<(), Box<dyn std::error::Error>> {
    println!("cargo:rerun-if-changed=proto");
    tonic_prost_build::configure()
        // Block payloads are handed around without copying.
        .bytes(".")
        .compile_protos(&["proto/replica.proto", "proto/engine.proto"], &["proto"])?;
    Ok(())
}
