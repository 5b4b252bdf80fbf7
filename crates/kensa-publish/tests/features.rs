//! The librdkafka Kensa links is built with what plants need (issue #20): TLS, SASL PLAIN,
//! SCRAM and GSSAPI, and zstd. Read from librdkafka's own `builtin.features`, so a build
//! without one of them (a feature of the rdkafka crate dropped, cyrus-sasl not found by
//! cmake) fails here rather than at a plant's broker. GSSAPI also needs the Kerberos plugin of
//! cyrus-sasl at run time (`libsasl2-modules-gssapi-mit`, in the image's runtime stage).

use rdkafka::config::ClientConfig;
use rdkafka::producer::BaseProducer;

/// librdkafka's `builtin.features` of a native producer config.
fn builtin_features() -> Vec<String> {
    let native = ClientConfig::new().create_native_config().expect("a native librdkafka config");
    let text = native.get("builtin.features").expect("builtin.features");
    text.split(',').map(|f| f.trim().to_string()).collect()
}

#[test]
fn librdkafka_is_built_with_tls_sasl_plain_scram_gssapi_and_zstd() {
    let have = builtin_features();
    for want in ["ssl", "sasl", "sasl_plain", "sasl_scram", "sasl_gssapi", "zstd"] {
        assert!(have.iter().any(|f| f == want), "librdkafka lacks {want}: builtin.features = {have:?}");
    }
}

#[test]
fn a_producer_takes_zstd_compression_and_sasl_settings() {
    // librdkafka refuses a codec or mechanism it was built without when the client is made.
    for mechanism in ["PLAIN", "SCRAM-SHA-512"] {
        let p: Result<BaseProducer, _> = ClientConfig::new()
            .set("bootstrap.servers", "127.0.0.1:1")
            .set("compression.type", "zstd")
            .set("security.protocol", "SASL_PLAINTEXT")
            .set("sasl.mechanism", mechanism)
            .set("sasl.username", "kensa")
            .set("sasl.password", "unused")
            .create();
        assert!(p.is_ok(), "{mechanism} with zstd: {:?}", p.err());
    }
}
