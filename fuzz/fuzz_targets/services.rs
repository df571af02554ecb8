//! A services file (`vmatrix apply -f`): any text gives services or a one-line error with its
//! line, never a panic; a file it names (`user_data = …`) is never there.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let text = String::from_utf8_lossy(data);
    match vmatrix_core::parse_services("services.toml", &text, &|name| {
        Err(format!("{name}: not in the fuzzer's world"))
    }) {
        Ok(specs) => {
            // What parses also passes the check the controller makes again.
            let _ = vmatrix_core::validate_services(&specs);
        }
        Err(e) => assert!(!e.to_string().is_empty()),
    }
});
