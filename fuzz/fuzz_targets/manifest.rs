//! A manifest read from a repository (`manifests/<id>.json`): any bytes give a manifest or an
//! error, never a panic; what parses writes back to bytes that parse to the same manifest.
#![no_main]

use libfuzzer_sys::fuzz_target;
use vmatrix_store::manifest::Manifest;

fuzz_target!(|data: &[u8]| {
    // Under its own id (a manifest is named by its hash): the parser past the hash check.
    let id = blake3::hash(data).to_hex().to_string();
    if let Ok(m) = Manifest::from_bytes(&id, data) {
        let (id, bytes) = m.to_bytes();
        let again = Manifest::from_bytes(&id, &bytes).expect("a written manifest reads back");
        assert_eq!(again.to_bytes().1, bytes);
    }
    // Under another id: refused, whatever the bytes.
    assert!(Manifest::from_bytes("0", data).is_err());
});
