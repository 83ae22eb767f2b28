//! Compiles the gRPC contracts in `proto/` for the client side only, with the pure-Rust `protox`
//! (no `protoc` needed). The SDK carries its own generated code so it does not depend on the
//! server crate.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let protos = [
        "../../proto/reseolio.proto",
        "../../proto/gantry_jobs.proto",
    ];
    for proto in protos {
        println!("cargo:rerun-if-changed={proto}");
    }
    let fds = protox::compile(protos, ["../../proto"])?;
    tonic_prost_build::configure()
        .build_client(true)
        .build_server(false)
        .compile_fds(fds)?;
    Ok(())
}
