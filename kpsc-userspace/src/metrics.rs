//! Prometheus metrics. Hot-path handles (per api key, per port) are resolved once so a
//! frame costs an atomic add, not a label lookup.

use std::{
    collections::BTreeSet,
    sync::{Arc, Mutex, OnceLock, PoisonError},
};

use prometheus_client::{
    encoding::{EncodeLabelSet, text::encode},
    metrics::{counter::Counter, family::Family, gauge::Gauge, histogram::Histogram},
    registry::Registry,
};

use crate::kafka::names::api_name;

/// Api keys are small non-negative numbers; one slot each, plus one for anything else.
const API_SLOTS: usize = 128;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ApiLabel {
    pub api: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct PortLabels {
    pub listen_port: String,
    pub broker: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ByteLabels {
    pub listen_port: String,
    pub broker: String,
    pub direction: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ReasonLabel {
    pub reason: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct EndpointLabel {
    pub endpoint_id: String,
}

/// Distinct endpoint ids that get their own series when no allow-list bounds them; later
/// ones share `endpoint_id="other"`, so a stream of forged ids cannot grow the scrape.
const MAX_ENDPOINT_SERIES: usize = 64;

/// Counters of one listen port, shared by all its connections; also read by `/maps`.
#[derive(Clone, Debug)]
pub struct PortCounters {
    pub connections_open: Gauge,
    pub connections_total: Counter,
    pub bytes_from_client: Counter,
    pub bytes_to_client: Counter,
    /// `--bulk-transfer sockmap`, client -> broker: what the kernel carried and the
    /// frames kpscd handled itself.
    pub kernel_from_client: KernelCounters,
    /// The same, broker -> client.
    pub kernel_to_client: KernelCounters,
}

/// One direction of one port on the kernel path.
#[derive(Clone, Debug, Default)]
pub struct KernelCounters {
    pub redirected_bytes: Counter,
    pub redirected_frames: Counter,
    pub passed_frames: Counter,
    /// Times kpscd took the stream over because the peer read too slowly.
    pub backlog_holds: Counter,
}

/// One metric family by api key. A series exists from the api's first use: scrapes carry
/// the apis this instance saw, not ~90 keys times every histogram bucket at zero. The hot
/// path after the first use is an index and an atomic add.
struct PerApi<M> {
    family: Family<ApiLabel, M, fn() -> M>,
    slots: Box<[OnceLock<M>]>,
}

impl<M: Clone + prometheus_client::metrics::TypedMetric + prometheus_client::encoding::EncodeMetric>
    PerApi<M>
{
    fn new(constructor: fn() -> M) -> Self {
        Self {
            family: Family::new_with_constructor(constructor),
            slots: (0..API_SLOTS).map(|_| OnceLock::new()).collect(),
        }
    }

    fn get(&self, api_key: i16) -> &M {
        let slot = slot(api_key);
        self.slots[slot].get_or_init(|| self.family.get_or_create(&api_label(slot)).clone())
    }
}

pub struct Metrics {
    registry: Registry,
    connections_open: Family<PortLabels, Gauge>,
    connections_total: Family<PortLabels, Counter>,
    bytes: Family<ByteLabels, Counter>,
    kernel_redirected_bytes: Family<ByteLabels, Counter>,
    kernel_redirected_frames: Family<ByteLabels, Counter>,
    kernel_passed_frames: Family<ByteLabels, Counter>,
    kernel_backlog_holds: Family<ByteLabels, Counter>,
    requests: PerApi<Counter>,
    rewrites: PerApi<Counter>,
    version_caps: PerApi<Counter>,
    decode_failures: PerApi<Counter>,
    hidden_stripped: PerApi<Counter>,
    latency: PerApi<Histogram>,
    connection_errors: Family<ReasonLabel, Counter>,
    brokers_refused: Family<ReasonLabel, Counter>,
    forbidden_requests: Family<ApiLabel, Counter>,
    connections_rejected: Family<ReasonLabel, Counter>,
    endpoint_connections: Family<EndpointLabel, Counter>,
    endpoint_ids_seen: Mutex<BTreeSet<String>>,
    pub ready: Gauge,
    pub brokers_known: Gauge,
    pub metadata_refresh_failures: Counter,
    /// Bytes moved by splice(2), never entering kpscd's memory (both directions).
    pub spliced_bytes: Counter,
    /// Rewrites that waited for room in --rewrite-memory-budget.
    pub rewrite_budget_waits: Counter,
}

fn api_label(slot: usize) -> ApiLabel {
    ApiLabel {
        api: if slot < API_SLOTS - 1 {
            api_name(slot as i16).to_owned()
        } else {
            "unknown".to_owned()
        },
    }
}

fn slot(api_key: i16) -> usize {
    usize::try_from(api_key)
        .ok()
        .filter(|&k| k < API_SLOTS - 1)
        .unwrap_or(API_SLOTS - 1)
}

fn latency_buckets() -> impl Iterator<Item = f64> {
    // 50us .. ~26s, doubling.
    prometheus_client::metrics::histogram::exponential_buckets(0.00005, 2.0, 20)
}

impl Metrics {
    pub fn new() -> Arc<Self> {
        let mut registry = Registry::with_prefix("kpsc");
        let connections_open = Family::<PortLabels, Gauge>::default();
        let connections_total = Family::<PortLabels, Counter>::default();
        let bytes = Family::<ByteLabels, Counter>::default();
        let kernel_redirected_bytes = Family::<ByteLabels, Counter>::default();
        let kernel_redirected_frames = Family::<ByteLabels, Counter>::default();
        let kernel_passed_frames = Family::<ByteLabels, Counter>::default();
        let kernel_backlog_holds = Family::<ByteLabels, Counter>::default();
        registry.register(
            "kernel_redirected_bytes",
            "Bytes the kernel carried socket to socket (--bulk-transfer sockmap), per listen \
             port, broker and direction; also counted in kpsc_bytes",
            kernel_redirected_bytes.clone(),
        );
        registry.register(
            "kernel_redirected_frames",
            "Frames the kernel carried socket to socket (--bulk-transfer sockmap), per listen \
             port, broker and direction",
            kernel_redirected_frames.clone(),
        );
        registry.register(
            "kernel_passed_frames",
            "Frames of kernel-path connections that kpscd handled itself (ApiVersions, SASL, a \
             frame head split over two packets, ...), per listen port, broker and direction",
            kernel_passed_frames.clone(),
        );
        registry.register(
            "kernel_backlog_holds",
            "Times kpscd took a kernel-path stream over because more than 4 MiB the kernel \
             redirected waited for a peer slow to read (--bulk-transfer sockmap), per listen \
             port, broker and direction",
            kernel_backlog_holds.clone(),
        );
        let requests = PerApi::new(Counter::default);
        let rewrites = PerApi::new(Counter::default);
        let version_caps = PerApi::new(Counter::default);
        let decode_failures = PerApi::new(Counter::default);
        let hidden_stripped = PerApi::new(Counter::default);
        registry.register(
            "hidden_addresses_stripped",
            "Tagged fields dropped from responses because clients would read addresses in them \
             that the response version's schema does not have (e.g. node_endpoints in Produce v9), per api",
            hidden_stripped.family.clone(),
        );
        let latency = PerApi::new(|| Histogram::new(latency_buckets()));
        let connection_errors = Family::<ReasonLabel, Counter>::default();
        let brokers_refused = Family::<ReasonLabel, Counter>::default();
        registry.register(
            "brokers_refused",
            "Brokers named by metadata that got no listener, per reason (too_many_dynamic, \
             invalid_port, out_of_range, bind_failed, ...); clients are never told of them",
            brokers_refused.clone(),
        );
        let forbidden_requests = Family::<ApiLabel, Counter>::default();
        let connections_rejected = Family::<ReasonLabel, Counter>::default();
        registry.register(
            "connections_rejected",
            "Client connections closed before any byte reached a broker, per reason \
             (proxy_header_missing, proxy_header_malformed, proxy_header_timeout, \
             source_not_allowed, endpoint_id_not_allowed)",
            connections_rejected.clone(),
        );
        let endpoint_connections = Family::<EndpointLabel, Counter>::default();
        registry.register(
            "endpoint_connections",
            "Client connections admitted, per private endpoint id from the PROXY v2 header \
             (none: no id; other: past the first 64 ids when no --allow-endpoint-id bounds them)",
            endpoint_connections.clone(),
        );
        let ready = Gauge::default();
        let brokers_known = Gauge::default();
        let metadata_refresh_failures = Counter::default();
        let spliced_bytes = Counter::default();
        let rewrite_budget_waits = Counter::default();
        registry.register(
            "rewrite_budget_waits",
            "Response rewrites that waited for room in --rewrite-memory-budget",
            rewrite_budget_waits.clone(),
        );
        registry.register(
            "spliced_bytes",
            "Bytes moved by splice(2) without entering kpscd's memory (--bulk-transfer splice)",
            spliced_bytes.clone(),
        );
        registry.register(
            "connections_open",
            "Client connections open, per listen port and broker",
            connections_open.clone(),
        );
        registry.register(
            "connections",
            "Client connections accepted, per listen port and broker",
            connections_total.clone(),
        );
        registry.register(
            "bytes",
            "Bytes forwarded, per listen port, broker and direction (from_client, to_client)",
            bytes.clone(),
        );
        registry.register(
            "requests",
            "Requests forwarded, per api",
            requests.family.clone(),
        );
        registry.register(
            "rewrites",
            "Responses whose broker addresses were rewritten, per api",
            rewrites.family.clone(),
        );
        registry.register(
            "api_version_caps",
            "ApiVersions entries capped or removed so clients never negotiate an unrewritable version, per api",
            version_caps.family.clone(),
        );
        registry.register(
            "decode_failures",
            "Address-bearing responses that could not be decoded (connection closed), per api",
            decode_failures.family.clone(),
        );
        registry.register(
            "request_duration_seconds",
            "Time from forwarding a request to delivering its response, per api (under \
             --bulk-transfer sockmap only the responses kpscd delivered itself: the kernel's \
             deliveries are counted later, in batches)",
            latency.family.clone(),
        );
        registry.register(
            "connection_errors",
            "Connections closed because of an error, per reason",
            connection_errors.clone(),
        );
        registry.register(
            "forbidden_requests",
            "Requests refused by --forbidden-api-keys, per api",
            forbidden_requests.clone(),
        );
        registry.register(
            "ready",
            "1 when metadata is known, every listen port is bound and no stop signal came",
            ready.clone(),
        );
        registry.register(
            "brokers_known",
            "Brokers in the port map",
            brokers_known.clone(),
        );
        registry.register(
            "metadata_refresh_failures",
            "Metadata refreshes that reached no broker",
            metadata_refresh_failures.clone(),
        );
        Arc::new(Self {
            requests,
            rewrites,
            version_caps,
            decode_failures,
            hidden_stripped,
            latency,
            registry,
            connections_open,
            connections_total,
            bytes,
            kernel_redirected_bytes,
            kernel_redirected_frames,
            kernel_passed_frames,
            kernel_backlog_holds,
            connection_errors,
            brokers_refused,
            forbidden_requests,
            connections_rejected,
            endpoint_connections,
            endpoint_ids_seen: Mutex::default(),
            ready,
            brokers_known,
            metadata_refresh_failures,
            spliced_bytes,
            rewrite_budget_waits,
        })
    }

    pub fn port(&self, listen_port: u16, broker: &str) -> PortCounters {
        let labels = PortLabels {
            listen_port: listen_port.to_string(),
            broker: broker.to_owned(),
        };
        let of = |family: &Family<ByteLabels, Counter>, direction: &str| {
            family
                .get_or_create(&ByteLabels {
                    listen_port: labels.listen_port.clone(),
                    broker: labels.broker.clone(),
                    direction: direction.to_owned(),
                })
                .clone()
        };
        let bytes = |direction: &str| of(&self.bytes, direction);
        PortCounters {
            connections_open: self.connections_open.get_or_create(&labels).clone(),
            connections_total: self.connections_total.get_or_create(&labels).clone(),
            bytes_from_client: bytes("from_client"),
            bytes_to_client: bytes("to_client"),
            kernel_from_client: KernelCounters {
                redirected_bytes: of(&self.kernel_redirected_bytes, "from_client"),
                redirected_frames: of(&self.kernel_redirected_frames, "from_client"),
                passed_frames: of(&self.kernel_passed_frames, "from_client"),
                backlog_holds: of(&self.kernel_backlog_holds, "from_client"),
            },
            kernel_to_client: KernelCounters {
                redirected_bytes: of(&self.kernel_redirected_bytes, "to_client"),
                redirected_frames: of(&self.kernel_redirected_frames, "to_client"),
                passed_frames: of(&self.kernel_passed_frames, "to_client"),
                backlog_holds: of(&self.kernel_backlog_holds, "to_client"),
            },
        }
    }

    pub fn request(&self, api_key: i16) {
        self.requests.get(api_key).inc();
    }
    pub fn rewrite(&self, api_key: i16) {
        self.rewrites.get(api_key).inc();
    }
    pub fn version_cap(&self, api_key: i16) {
        self.version_caps.get(api_key).inc();
    }
    pub fn decode_failure(&self, api_key: i16) {
        self.decode_failures.get(api_key).inc();
    }
    pub fn hidden_stripped(&self, api_key: i16) {
        self.hidden_stripped.get(api_key).inc();
    }
    pub fn latency(&self, api_key: i16, seconds: f64) {
        self.latency.get(api_key).observe(seconds);
    }
    pub fn connection_error(&self, reason: &str) {
        self.connection_errors
            .get_or_create(&ReasonLabel {
                reason: reason.to_owned(),
            })
            .inc();
    }
    pub fn broker_refused(&self, reason: &str) {
        self.brokers_refused
            .get_or_create(&ReasonLabel {
                reason: reason.to_owned(),
            })
            .inc();
    }
    pub fn forbidden(&self, api_key: i16) {
        self.forbidden_requests
            .get_or_create(&api_label(slot(api_key)))
            .inc();
    }

    pub fn connection_rejected(&self, reason: &str) {
        self.connections_rejected
            .get_or_create(&ReasonLabel {
                reason: reason.to_owned(),
            })
            .inc();
    }

    /// Counts an admitted connection under its endpoint id. `bounded` says the id was
    /// checked against an allow-list (so the label set is the operator's); otherwise only
    /// the first ids seen get a series of their own.
    pub fn endpoint_connection(&self, endpoint_id: Option<&str>, bounded: bool) {
        let label = match endpoint_id {
            None => "none".to_owned(),
            Some(id) if bounded => id.to_owned(),
            Some(id) => {
                let mut seen = self
                    .endpoint_ids_seen
                    .lock()
                    .unwrap_or_else(PoisonError::into_inner);
                if seen.contains(id) || seen.len() < MAX_ENDPOINT_SERIES {
                    seen.insert(id.to_owned());
                    id.to_owned()
                } else {
                    "other".to_owned()
                }
            }
        };
        self.endpoint_connections
            .get_or_create(&EndpointLabel { endpoint_id: label })
            .inc();
    }

    /// Prometheus text exposition.
    pub fn render(&self) -> String {
        let mut out = String::new();
        encode(&mut out, &self.registry).expect("writing to a String cannot fail");
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A scrape carries a series per api only once the api was used: an idle instance
    /// exposes no per-api histogram buckets at all.
    #[test]
    fn per_api_series_appear_on_first_use() {
        let metrics = Metrics::new();
        let idle = metrics.render();
        assert!(!idle.contains("api=\""), "{idle}");
        metrics.request(3);
        metrics.latency(3, 0.001);
        metrics.request(3);
        let used = metrics.render();
        assert!(
            used.contains("kpsc_requests_total{api=\"Metadata\"} 2"),
            "{used}"
        );
        assert_eq!(
            used.matches("api=\"").count(),
            used.matches("api=\"Metadata\"").count()
        );
        assert!(!used.contains("api=\"Produce\""), "{used}");
    }

    /// Without an allow-list, forged endpoint ids cannot add series without bound.
    #[test]
    fn endpoint_id_series_are_bounded() {
        let metrics = Metrics::new();
        for i in 0..1000 {
            metrics.endpoint_connection(Some(&format!("vpce-{i}")), false);
        }
        metrics.endpoint_connection(Some("vpce-1"), false);
        metrics.endpoint_connection(None, false);
        let text = metrics.render();
        let series = text.matches("kpsc_endpoint_connections_total{").count();
        assert_eq!(series, MAX_ENDPOINT_SERIES + 2, "{text}");
        assert!(text.contains("endpoint_id=\"vpce-1\"} 2"), "{text}");
        assert!(
            text.contains(&format!(
                "endpoint_id=\"other\"}} {}",
                1000 - MAX_ENDPOINT_SERIES
            )),
            "{text}"
        );
        assert!(text.contains("endpoint_id=\"none\"} 1"), "{text}");
    }
}
