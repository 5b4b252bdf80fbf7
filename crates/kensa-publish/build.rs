fn main() {
    println!("cargo:rerun-if-changed=../../proto/kensa/v1/event.proto");
    prost_build::Config::new()
        .compile_protos(&["../../proto/kensa/v1/event.proto"], &["../../proto"])
        .expect("compile proto/kensa/v1/event.proto (is protoc installed? scripts/setup.sh installs it)");
}
