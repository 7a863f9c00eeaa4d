//! Points the binaries at the prebuilt libduckdb through an rpath, so they run without
//! LD_LIBRARY_PATH (DESIGN.md section 7), and fails early with a hint when it is missing.

fn main() {
    println!("cargo:rerun-if-env-changed=DUCKDB_LIB_DIR");
    println!("cargo:rerun-if-changed=build.rs");
    if std::env::var_os("CARGO_FEATURE_BUNDLED").is_some() {
        return;
    }
    let Some(lib_dir) = std::env::var_os("DUCKDB_LIB_DIR") else {
        return;
    };
    let lib_dir = std::path::PathBuf::from(lib_dir);
    if !lib_dir.join("libduckdb.so").is_file() {
        panic!(
            "libduckdb.so not found in {}: run scripts/fetch-libduckdb.sh first \
             (or build with --features bundled)",
            lib_dir.display()
        );
    }
    println!("cargo:rustc-link-arg=-Wl,-rpath,{}", lib_dir.display());
}
