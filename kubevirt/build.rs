//! Generates the gRPC code of KubeVirt's hook APIs from proto/ with the protoc that the
//! protoc-bin-vendored crate ships, so that the build needs nothing outside crates.io.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let protoc = protoc_bin_vendored::protoc_bin_path()?;
    // prost-build runs protoc from PROTOC; a build script is single-threaded.
    std::env::set_var("PROTOC", protoc);
    tonic_prost_build::configure().compile_protos(
        &[
            "proto/info.proto",
            "proto/v1alpha3.proto",
            "proto/plugins.proto",
        ],
        &["proto"],
    )?;
    Ok(())
}
