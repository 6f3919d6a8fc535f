//! Seeds the fuzz corpus: `fuzz/corpus/<target>/`, in each target's input format
//! (`kpsc_fuzz`), from
//! - real captures: librdkafka's mock cluster and the tansu broker answering real clients
//!   and every request version they offer (`record`);
//! - responses of every address-bearing API and version with every field set (`fixtures`),
//!   the Produce request of every version, and command lines and files from the README.
//!
//! `cargo xtask fuzz --seed`, or `TANSU_BIN=... cargo run --release --manifest-path
//! fuzz/Cargo.toml --example seed -- [--no-capture] [--out DIR]` (the brokers come from the
//! integration tests' harness, `kpsc-tests`). File names carry a hash of the content, so
//! running it again adds only what is new (captures differ run to run: ports, timestamps).

mod fixtures;
mod record;

use std::{
    collections::{BTreeMap, HashMap, HashSet},
    path::PathBuf,
};

use bytes::BytesMut;
use kafka_protocol::{
    messages::{ApiKey, ProduceRequest, RequestHeader},
    protocol::{Encodable, Message, StrBytes},
};
use kpsc::{
    kafka::names::api_name,
    proxy::rewrite::{api_versions, apis::ALL, response::AddressResponse},
};
use kpsc_fuzz::{
    ApiVersionsInput, ConfigInput, DiscoveryInput, FrameInput, FrameMode, ResponseInput,
};

/// Captures kept per (source, target, api, version): repeated requests differ only in
/// offsets and timestamps.
const CAPTURES_PER_KIND: usize = 2;

fn main() -> anyhow::Result<()> {
    let mut out = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("corpus");
    let mut capture = true;
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        match arg.as_str() {
            "--out" => out = args.next().expect("--out DIR").into(),
            "--no-capture" => capture = false,
            other => anyhow::bail!("unknown argument {other:?}"),
        }
    }
    let mut corpus = Corpus::new(out);
    fixture_seeds(&mut corpus);
    request_seeds(&mut corpus);
    config_seeds(&mut corpus);
    proxy_header_seeds(&mut corpus);
    if capture {
        for capture in [record::mock_cluster()?, record::tansu()?] {
            capture_seeds(&mut corpus, &capture);
        }
    }
    for (target, count) in &corpus.written {
        println!("{target}: {count} new seeds");
    }
    Ok(())
}

struct Corpus {
    root: PathBuf,
    written: BTreeMap<&'static str, usize>,
    kinds: HashMap<String, usize>,
    /// Content hashes present per target (the suffix of every file name).
    hashes: HashSet<(&'static str, String)>,
    /// Targets whose existing files are in `hashes`.
    loaded: HashSet<&'static str>,
}

impl Corpus {
    fn new(root: PathBuf) -> Self {
        Self {
            root,
            written: BTreeMap::new(),
            kinds: HashMap::new(),
            hashes: HashSet::new(),
            loaded: HashSet::new(),
        }
    }

    /// Writes `data` as `<target>/<name>-<hash>` unless the target has that content.
    fn add(&mut self, target: &'static str, name: &str, data: &[u8]) {
        let dir = self.root.join(target);
        if self.loaded.insert(target) {
            std::fs::create_dir_all(&dir).expect("corpus directory");
            for entry in std::fs::read_dir(&dir).expect("corpus directory") {
                let file = entry.expect("corpus entry").file_name();
                if let Some((_, hash)) = file.to_string_lossy().rsplit_once('-') {
                    self.hashes.insert((target, hash.to_owned()));
                }
            }
        }
        let hash = format!("{:016x}", fnv1a(data));
        if self.hashes.insert((target, hash.clone())) {
            std::fs::write(dir.join(format!("{name}-{hash}")), data).expect("corpus file");
            *self.written.entry(target).or_default() += 1;
        }
    }

    /// `add`, at most [`CAPTURES_PER_KIND`] times per `name`.
    fn add_capture(&mut self, target: &'static str, name: &str, data: &[u8]) {
        let seen = self.kinds.entry(format!("{target}/{name}")).or_default();
        if *seen < CAPTURES_PER_KIND {
            *seen += 1;
            self.add(target, name, data);
        }
    }
}

/// What cloud endpoints and load balancers send: v2 with each cloud's endpoint TLV (and
/// an unrelated one), v2 LOCAL, v1 lines; each followed by the first bytes of a Kafka frame.
fn proxy_header_seeds(corpus: &mut Corpus) {
    use kpsc::proxy::proxy_header::{TLV_AWS, TLV_AZURE, TLV_GCP, encode_v2};
    let src: std::net::SocketAddr = "198.18.3.4:40000".parse().expect("address");
    let dst: std::net::SocketAddr = "[2001:db8::2]:9092".parse().expect("address");
    let dst4: std::net::SocketAddr = "198.18.0.1:9092".parse().expect("address");
    let kafka = b"\0\0\0\x16\0\x12\0\x03";
    let vpce = [&[1u8][..], b"vpce-08d2bf15fac5001c9"].concat();
    let seeds: Vec<(&str, Vec<u8>)> = vec![
        (
            "v2-gcp",
            encode_v2(
                src,
                dst4,
                &[(TLV_GCP, &43_686_719_580_552_292u64.to_be_bytes())],
            ),
        ),
        (
            "v2-aws",
            encode_v2(src, dst4, &[(0x02, b"kafka.example"), (TLV_AWS, &vpce)]),
        ),
        (
            "v2-azure",
            encode_v2(src, dst4, &[(TLV_AZURE, &[1, 0x33, 0, 0, 0x26])]),
        ),
        (
            "v2-v6",
            encode_v2("[2001:db8::1]:40000".parse().expect("address"), dst, &[]),
        ),
        ("v2-local", b"\r\n\r\n\0\r\nQUIT\n\x20\0\0\0".to_vec()),
        (
            "v1-tcp4",
            b"PROXY TCP4 198.18.3.4 198.18.0.1 40000 9092\r\n".to_vec(),
        ),
        (
            "v1-tcp6",
            b"PROXY TCP6 2001:db8::1 2001:db8::2 40000 9092\r\n".to_vec(),
        ),
        ("v1-unknown", b"PROXY UNKNOWN\r\n".to_vec()),
    ];
    for (name, header) in seeds {
        corpus.add("proxy_header", name, &[&header[..], kafka].concat());
    }
}

fn fnv1a(data: &[u8]) -> u64 {
    data.iter().fold(0xcbf2_9ce4_8422_2325, |hash, &b| {
        (hash ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
    })
}

fn slug(api_key: i16) -> String {
    api_name(api_key).to_lowercase()
}

fn fixture_seeds(corpus: &mut Corpus) {
    let mut stream = Vec::new();
    for api in ALL {
        for v in api.versions() {
            for tags in [false, true] {
                let body = fixtures::response(api.key, v, tags).expect("a fixture per API");
                if let Err(e) = AddressResponse::decode(api, v, body.clone()) {
                    panic!("kpsc refuses the {} v{v} fixture: {e}", api.name());
                }
                let name = format!("fixture-{}-v{v}{}", slug(api.key as i16), suffix(tags));
                let seed = ResponseInput::seed(api.key, v, &body).expect("a decodable version");
                corpus.add("response_rewrite", &name, &seed);
                if api.key == ApiKey::Metadata {
                    add_discovery(corpus, &name, Some(v), &body);
                }
                if !tags && v == *api.versions().end() {
                    stream.extend_from_slice(&(body.len() as i32).to_be_bytes());
                    stream.extend_from_slice(&body);
                }
            }
        }
    }
    for mode in [FrameMode::ReadFrame, FrameMode::Responses] {
        corpus.add(
            "frame_reader",
            &format!("fixture-responses-{mode:?}").to_lowercase(),
            &FrameInput::seed(mode, &stream),
        );
    }
    let range = kafka_protocol::messages::ApiVersionsResponse::VERSIONS;
    for v in range.min..=range.max {
        for tags in [false, true] {
            let body = fixtures::response(ApiKey::ApiVersions, v, tags).expect("ApiVersions");
            let name = format!("fixture-apiversions-v{v}{}", suffix(tags));
            corpus.add("api_versions", &name, &ApiVersionsInput::seed(v, &body));
            if v == 0 {
                add_discovery(corpus, &name, None, &body);
            }
        }
    }
    // kpsc's own answer to a request newer than it decodes, and a broker's (v0 format).
    let unsupported = api_versions::unsupported_api_versions_response(7);
    for request in [3, 5] {
        corpus.add(
            "api_versions",
            &format!("fixture-apiversions-unsupported-request-v{request}"),
            &ApiVersionsInput::seed(request, &unsupported),
        );
    }
}

/// A discovery seed: `body` answering the discovery client's request (its correlation id
/// set to the client's: 1 for ApiVersions v0, 2 for Metadata).
fn add_discovery(corpus: &mut Corpus, name: &str, metadata_version: Option<i16>, body: &[u8]) {
    let mut body = body.to_vec();
    if body.len() < 4 {
        return;
    }
    let correlation_id: i32 = if metadata_version.is_some() { 2 } else { 1 };
    body[..4].copy_from_slice(&correlation_id.to_be_bytes());
    if let Some(seed) = DiscoveryInput::seed(metadata_version, &body) {
        corpus.add_capture("discovery", name, &seed);
    }
}

fn suffix(tags: bool) -> &'static str {
    if tags { "-tags" } else { "" }
}

/// Produce requests of every version, each `acks`, with and without a transactional id.
fn request_seeds(corpus: &mut Corpus) {
    let range = ProduceRequest::VERSIONS;
    for v in range.min..=range.max {
        for (acks, transactional_id) in [(-1, None), (0, None), (1, Some("txn-1"))] {
            let header = RequestHeader::default()
                .with_request_api_key(ApiKey::Produce as i16)
                .with_request_api_version(v)
                .with_correlation_id(7)
                .with_client_id(Some(StrBytes::from_static_str("rdkafka")));
            let mut request = ProduceRequest::default()
                .with_acks(acks)
                .with_timeout_ms(30_000);
            if v >= 3 {
                request = request.with_transactional_id(
                    transactional_id.map(|id| StrBytes::from_static_str(id).into()),
                );
            }
            let mut body = BytesMut::new();
            header
                .encode(&mut body, ApiKey::Produce.request_header_version(v))
                .unwrap();
            request.encode(&mut body, v).unwrap();
            let name = format!("fixture-produce-v{v}-acks{acks}");
            corpus.add("request_header", &name, &body);
        }
    }
}

/// The README's command lines and file, and a few wrong ones.
fn config_seeds(corpus: &mut Corpus) {
    let tidb = [
        "server",
        "--bootstrap-server-mapping",
        "127.0.0.1:9092,0.0.0.0:9092,b1.example.com:9092",
        "--bootstrap-server-mapping",
        "127.0.0.1:9093,0.0.0.0:9093,b2.example.com:9093",
        "--dynamic-sequential-min-port=9095",
        "--dynamic-advertised-listener=brokers.example.com",
    ];
    let file = r#"# kpscd proxy --config kpsc.toml
bootstrap_server_mapping = ["127.0.0.1:9092,0.0.0.0:9092,b1.example.com:9092"]
dynamic_sequential_min_port = 9095
dynamic_advertised_listener = "b<broker_id>.example.com"
default_listener_ip = "0.0.0.0"
bulk_policy = "cap"
log_format = "json"
shutdown_timeout = "3s"
"#;
    let portmap_file = "bootstrap_server_mapping = [\"127.0.0.1:9092,0.0.0.0:19092,b1.example.com:19092\"]\ninterface = [\"lo\"]\ninstance = \"kpsc\"\n";
    let seeds: &[(&str, &[&str], Option<&str>)] = &[
        ("tidb-guide", &tidb, None),
        (
            "proxy-file",
            &["proxy", "--config", "kpsc.toml"],
            Some(file),
        ),
        (
            "proxy-file-and-flags",
            &[
                "proxy",
                "--config",
                "kpsc.toml",
                "--dynamic-sequential-min-port",
                "21000",
                "--bulk-policy",
                "rewrite",
                "--forbidden-api-keys",
                "20,21",
                "--max-frame-size",
                "1048576",
            ],
            Some(file),
        ),
        (
            "proxy-static",
            &[
                "proxy",
                "--bootstrap-server-mapping",
                "127.0.0.1:9092,127.0.0.1:19092",
                "--dynamic-listeners-disable",
                "--http-disable",
                "--external-server-mapping",
                "127.0.0.1:9093,b2.example.com:19093",
                "--deterministic-listeners=false",
                "--log-level",
                "warning",
            ],
            None,
        ),
        (
            "portmap",
            &[
                "portmap",
                "--interface",
                "lo,eth0",
                "--bootstrap-server-mapping",
                "127.0.0.1:9092,0.0.0.0:19092,b1.example.com:19092",
                "--pin-root",
                "/sys/fs/bpf/kpsc",
            ],
            None,
        ),
        (
            "portmap-file",
            &["portmap", "--config", "p.toml"],
            Some(portmap_file),
        ),
        (
            "portmap-proxy-key",
            &["portmap", "--config", "p.toml"],
            Some(file),
        ),
        ("unsupported-flag", &["server", "--tls-enable"], None),
    ];
    for (name, args, file) in seeds {
        corpus.add("config", name, &ConfigInput::seed(args, *file));
    }
}

fn capture_seeds(corpus: &mut Corpus, capture: &record::Capture) {
    let mut exchanges = 0;
    for e in &capture.exchanges {
        let kind = format!("{}-{}-v{}", e.source, slug(e.api_key), e.version);
        corpus.add_capture("request_header", &kind, &e.request);
        let Some(response) = &e.response else {
            continue;
        };
        exchanges += 1;
        if e.api_key == ApiKey::ApiVersions as i16 && e.version == 0 {
            add_discovery(corpus, &kind, None, response);
        }
        if e.api_key == ApiKey::Metadata as i16 {
            add_discovery(corpus, &kind, Some(e.version), response);
        }
        if e.api_key == ApiKey::ApiVersions as i16 {
            if let Ok(version) = u8::try_from(e.version + 1)
                && version <= 6
            {
                let seed = ApiVersionsInput::seed(e.version, response);
                corpus.add_capture("api_versions", &kind, &seed);
            }
        } else if let Ok(key) = ApiKey::try_from(e.api_key)
            && let Some(seed) = ResponseInput::seed(key, e.version, response)
        {
            corpus.add_capture("response_rewrite", &kind, &seed);
        }
    }
    for s in &capture.streams {
        let (direction, modes): (&str, &[FrameMode]) = if s.from_client {
            ("requests", &[FrameMode::Requests])
        } else {
            ("responses", &[FrameMode::ReadFrame, FrameMode::Responses])
        };
        for &mode in modes {
            let name = format!("{}-{direction}-{mode:?}", s.source).to_lowercase();
            corpus.add_capture("frame_reader", &name, &FrameInput::seed(mode, &s.bytes));
        }
    }
    eprintln!(
        "seed: {} answered exchanges, {} streams captured",
        exchanges,
        capture.streams.len()
    );
}
