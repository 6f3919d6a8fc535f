//! Api key names for logs and metric labels.

use std::sync::OnceLock;

use kafka_protocol::messages::ApiKey;

/// Name of an api key as kafka-protocol spells it ("Metadata", "Produce", ...);
/// "unknown" for keys kafka-protocol does not know.
pub fn api_name(api_key: i16) -> &'static str {
    // kafka-protocol only exposes the names through `Debug`; build the table once (a bounded,
    // one-time leak of ~90 short strings) so the hot path is an index lookup.
    static NAMES: OnceLock<Vec<Option<&'static str>>> = OnceLock::new();
    let names = NAMES.get_or_init(|| {
        let mut names = Vec::new();
        for key in ApiKey::iter() {
            let index = key as usize;
            if names.len() <= index {
                names.resize(index + 1, None);
            }
            names[index] = Some(&*Box::leak(format!("{key:?}").into_boxed_str()));
        }
        names
    });
    usize::try_from(api_key)
        .ok()
        .and_then(|index| names.get(index).copied().flatten())
        .unwrap_or("unknown")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn api_names() {
        assert_eq!(api_name(0), "Produce");
        assert_eq!(api_name(3), "Metadata");
        assert_eq!(api_name(18), "ApiVersions");
        assert_eq!(api_name(60), "DescribeCluster");
        assert_eq!(api_name(999), "unknown");
        assert_eq!(api_name(-1), "unknown");
        for key in ApiKey::iter() {
            assert_eq!(api_name(key as i16), format!("{key:?}"));
        }
    }
}
