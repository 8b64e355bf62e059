//! Generates Rust code for every proto under the workspace's `proto/` directory, plus one
//! encoded file descriptor set that the services hand to server reflection.

use std::path::PathBuf;

const PROTOS: &[&str] = &[
    "mesh/types/v1/types.proto",
    "mesh/gateway/v1/gateway.proto",
    "mesh/features/v1/features.proto",
    "mesh/logger/v1/logger.proto",
    "mesh/catalog/v1/catalog.proto",
    "mesh/admin/v1/admin.proto",
    "inference/grpc_predict_v2.proto",
];

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let proto_root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../proto");
    // tonic-prost-build does not print rerun-if-changed lines itself.
    for proto in PROTOS {
        println!(
            "cargo:rerun-if-changed={}",
            proto_root.join(proto).display()
        );
    }
    println!("cargo:rerun-if-env-changed=PROTOC");

    // A vendored protoc keeps the build free of system packages, unless PROTOC says otherwise.
    if std::env::var_os("PROTOC").is_none() {
        let protoc = protoc_bin_vendored::protoc_bin_path()?;
        // prost-build finds protoc through this variable.
        std::env::set_var("PROTOC", protoc);
    }

    let out_dir = PathBuf::from(std::env::var("OUT_DIR")?);
    let files: Vec<PathBuf> = PROTOS.iter().map(|p| proto_root.join(p)).collect();
    tonic_prost_build::configure()
        .file_descriptor_set_path(out_dir.join("mesh_descriptor.bin"))
        .compile_protos(&files, &[proto_root])?;
    Ok(())
}
