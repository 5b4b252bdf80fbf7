//! Property-based fuzzing of the config parser (cargo-fuzz needs a nightly toolchain, which this
//! project's build machine cannot fetch; proptest runs on stable, bounded, in every test run).

use kensa_core::config::KensaConfig;
use proptest::prelude::*;

const VALID: &str = r#"
[kafka]
brokers = "127.0.0.1:9092"
[products.p]
bank = "p.kbank"
[[cameras]]
id = "c"
product = "p"
source = { kind = "synthetic", seed = 1, count = 3 }
"#;

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    #[test]
    fn arbitrary_text_never_panics(text in "\\PC{0,400}") {
        if let Ok(c) = KensaConfig::from_toml_str(&text) {
            let _ = c.problems();
        }
    }

    #[test]
    fn mutated_valid_config_never_panics(pos in 0usize..VALID.len(), len in 0usize..12, with in "[ -~\\n]{0,12}") {
        let mut s = VALID.to_string();
        let start = pos.min(s.len());
        let end = (start + len).min(s.len());
        if s.is_char_boundary(start) && s.is_char_boundary(end) {
            s.replace_range(start..end, &with);
        }
        if let Ok(c) = KensaConfig::from_toml_str(&s) {
            let _ = c.problems();
        }
    }
}
