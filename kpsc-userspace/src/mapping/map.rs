//! The port map: `listen port -> broker`, computed from configuration plus cluster
//! metadata. Both modes use it: proxy mode binds a listener per entry, portmap mode puts
//! the static entries into the kernel.
//!
//! Invariants:
//! - same configuration + same brokers => same map (deterministic ports are `min + node id`;
//!   sequential ports follow node-id order within one metadata snapshot);
//! - no two brokers share a listen port; a conflict is an error naming both brokers;
//! - every broker address a client can see in a rewritten response has an entry here.

use std::{
    collections::HashMap,
    net::{IpAddr, SocketAddr},
};

use serde::{Deserialize, Serialize};

use crate::mapping::addr::{AdvertisedTemplate, BrokerAddr, StaticMapping};

/// How brokers found in metadata (and not mapped statically) get a port.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DynamicPorts {
    Disabled,
    /// `min_port + node_id - id_offset` (0 max_ports = no limit but 65535). The offset
    /// keeps the range tight for clusters whose ids start high (1001, 1002, ...).
    Deterministic {
        min_port: u16,
        max_ports: u16,
        id_offset: i32,
    },
    /// Next free port from `min_port`, in node-id order per metadata snapshot.
    Sequential {
        min_port: u16,
        max_ports: u16,
    },
}

impl DynamicPorts {
    /// The first port dynamic listeners may take; None when there are none.
    pub fn min_port(&self) -> Option<u16> {
        match self {
            Self::Disabled => None,
            Self::Deterministic { min_port, .. } | Self::Sequential { min_port, .. } => {
                Some(*min_port)
            }
        }
    }
}

#[derive(Clone, Debug)]
pub struct PortMapConfig {
    pub static_mappings: Vec<StaticMapping>,
    /// (broker, advertised): rewritten, but served by someone else (no listener here).
    pub external: Vec<(BrokerAddr, BrokerAddr)>,
    pub dynamic: DynamicPorts,
    pub listen_ip: IpAddr,
    pub advertised: Option<AdvertisedTemplate>,
    /// Most dynamic entries (listeners) metadata may create: a response naming hundreds
    /// of unknown brokers must not make kpscd bind hundreds of ports.
    pub max_dynamic: usize,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PortMapError {
    #[error("brokers {first} and {second} are both mapped to listen port {port}")]
    PortConflict {
        port: u16,
        first: String,
        second: String,
    },
    #[error("broker {broker} is mapped twice")]
    DuplicateBroker { broker: String },
    #[error(
        "broker id {node_id} ({broker}) gets port {min_port}+{node_id}-{id_offset}, outside the allowed range {min_port}..{end} (--dynamic-sequential-min-port, --dynamic-sequential-max-ports, --dynamic-broker-id-offset {id_offset})"
    )]
    OutOfRange {
        node_id: i32,
        broker: String,
        min_port: u16,
        end: u32,
        id_offset: i32,
    },
    #[error("no free dynamic port left for broker id {node_id} ({broker}) in {min_port}..{end}")]
    Exhausted {
        node_id: i32,
        broker: String,
        min_port: u16,
        end: u32,
    },
    #[error(
        "broker id {node_id} ({broker}) is not mapped and dynamic listeners are disabled: add a --bootstrap-server-mapping or --external-server-mapping for it, or set --dynamic-sequential-min-port"
    )]
    Unmapped { node_id: i32, broker: String },
    #[error(
        "broker id {node_id} ({broker}) would be dynamic listener number {limit}+1 (--max-dynamic-listeners {limit})"
    )]
    TooManyDynamic {
        node_id: i32,
        broker: String,
        limit: usize,
    },
    #[error("broker id {node_id} advertises {broker}: port 0 is not a broker address")]
    InvalidPort { node_id: i32, broker: String },
}

impl PortMapError {
    /// Metric label.
    pub fn reason(&self) -> &'static str {
        match self {
            Self::PortConflict { .. } => "port_conflict",
            Self::DuplicateBroker { .. } => "duplicate_broker",
            Self::OutOfRange { .. } => "out_of_range",
            Self::Exhausted { .. } => "exhausted",
            Self::Unmapped { .. } => "unmapped",
            Self::TooManyDynamic { .. } => "too_many_dynamic",
            Self::InvalidPort { .. } => "invalid_port",
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Origin {
    Static,
    Dynamic,
    External,
}

/// One broker's row in the map.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct MapEntry {
    pub broker: BrokerAddr,
    /// Known once the broker was seen in metadata.
    pub node_id: Option<i32>,
    /// Where kpsc listens for it; None for external mappings.
    pub listen: Option<SocketAddr>,
    pub advertised: BrokerAddr,
    pub origin: Origin,
}

impl MapEntry {
    fn describe(&self) -> String {
        match self.node_id {
            Some(id) => format!("id {id} ({})", self.broker),
            None => self.broker.to_string(),
        }
    }
}

/// The live map. Cheap to query; changes only when new brokers are learned.
#[derive(Clone, Debug)]
pub struct PortMap {
    config: PortMapConfig,
    entries: Vec<MapEntry>,
    by_broker: HashMap<BrokerAddr, usize>,
}

impl PortMapConfig {
    /// Checks the static part of the configuration (what can be checked before metadata).
    pub fn validate(&self) -> Result<(), PortMapError> {
        PortMap::new(self.clone()).map(|_| ())
    }
}

impl PortMap {
    pub fn new(config: PortMapConfig) -> Result<Self, PortMapError> {
        let mut map = Self {
            config: config.clone(),
            entries: Vec::new(),
            by_broker: HashMap::new(),
        };
        for m in &config.static_mappings {
            map.insert(MapEntry {
                broker: m.broker.clone(),
                node_id: None,
                listen: Some(m.listen),
                advertised: m.advertised.clone(),
                origin: Origin::Static,
            })?;
        }
        for (broker, advertised) in &config.external {
            map.insert(MapEntry {
                broker: broker.clone(),
                node_id: None,
                listen: None,
                advertised: advertised.clone(),
                origin: Origin::External,
            })?;
        }
        Ok(map)
    }

    fn owner_of_port(&self, port: u16) -> Option<&MapEntry> {
        self.entries
            .iter()
            .find(|e| e.listen.map(|l| l.port()) == Some(port))
    }

    fn insert(&mut self, entry: MapEntry) -> Result<(), PortMapError> {
        if self.by_broker.contains_key(&entry.broker) {
            return Err(PortMapError::DuplicateBroker {
                broker: entry.broker.to_string(),
            });
        }
        if let Some(port) = entry.listen.map(|l| l.port())
            && let Some(owner) = self.owner_of_port(port)
        {
            return Err(PortMapError::PortConflict {
                port,
                first: owner.describe(),
                second: entry.describe(),
            });
        }
        self.by_broker
            .insert(entry.broker.clone(), self.entries.len());
        self.entries.push(entry);
        Ok(())
    }

    pub fn entries(&self) -> &[MapEntry] {
        &self.entries
    }

    /// The advertised address for a broker address seen in a response.
    pub fn advertised_for(&self, host: &str, port: i32) -> Option<&BrokerAddr> {
        let port = u16::try_from(port).ok()?;
        // Allocation-free lookup would need a borrowed key type; this path runs only for
        // address-bearing responses, so a short String is fine.
        self.by_broker
            .get(&BrokerAddr::new(host, port))
            .map(|&i| &self.entries[i].advertised)
    }

    /// Adds entries for brokers from a metadata snapshot that are not mapped yet, and
    /// records node ids of mapped ones. Returns the new entries (which need listeners) and
    /// the brokers that could not be mapped.
    pub fn learn(&mut self, brokers: &[(i32, BrokerAddr)]) -> (Vec<MapEntry>, Vec<PortMapError>) {
        let mut sorted: Vec<&(i32, BrokerAddr)> = brokers.iter().collect();
        sorted.sort_by_key(|(id, _)| *id);
        let mut added = Vec::new();
        let mut errors = Vec::new();
        for (node_id, broker) in sorted {
            if let Some(&i) = self.by_broker.get(broker) {
                self.entries[i].node_id = Some(*node_id);
                continue;
            }
            match self.dynamic_entry(*node_id, broker) {
                Ok(entry) => match self.insert(entry.clone()) {
                    Ok(()) => added.push(entry),
                    Err(e) => errors.push(e),
                },
                Err(e) => errors.push(e),
            }
        }
        (added, errors)
    }

    fn dynamic_entry(&self, node_id: i32, broker: &BrokerAddr) -> Result<MapEntry, PortMapError> {
        if broker.port == 0 {
            return Err(PortMapError::InvalidPort {
                node_id,
                broker: broker.to_string(),
            });
        }
        let dynamic = self
            .entries
            .iter()
            .filter(|e| e.origin == Origin::Dynamic)
            .count();
        if dynamic >= self.config.max_dynamic && self.config.dynamic != DynamicPorts::Disabled {
            return Err(PortMapError::TooManyDynamic {
                node_id,
                broker: broker.to_string(),
                limit: self.config.max_dynamic,
            });
        }
        let port = match self.config.dynamic {
            DynamicPorts::Disabled => {
                return Err(PortMapError::Unmapped {
                    node_id,
                    broker: broker.to_string(),
                });
            }
            DynamicPorts::Deterministic {
                min_port,
                max_ports,
                id_offset,
            } => {
                let end = range_end(min_port, max_ports);
                let port = i64::from(min_port) + i64::from(node_id) - i64::from(id_offset);
                if node_id < 0 || port < i64::from(min_port) || port >= i64::from(end) {
                    return Err(PortMapError::OutOfRange {
                        node_id,
                        broker: broker.to_string(),
                        min_port,
                        end,
                        id_offset,
                    });
                }
                port as u16
            }
            DynamicPorts::Sequential {
                min_port,
                max_ports,
            } => {
                let end = range_end(min_port, max_ports);
                (u32::from(min_port)..end)
                    .map(|p| p as u16)
                    .find(|p| self.owner_of_port(*p).is_none())
                    .ok_or_else(|| PortMapError::Exhausted {
                        node_id,
                        broker: broker.to_string(),
                        min_port,
                        end,
                    })?
            }
        };
        let advertised = match &self.config.advertised {
            Some(t) => BrokerAddr::new(t.render_host(node_id), t.port.unwrap_or(port)),
            None => BrokerAddr::new(self.config.listen_ip.to_string(), port),
        };
        Ok(MapEntry {
            broker: broker.clone(),
            node_id: Some(node_id),
            listen: Some(SocketAddr::new(self.config.listen_ip, port)),
            advertised,
            origin: Origin::Dynamic,
        })
    }
}

/// One past the last usable port.
fn range_end(min_port: u16, max_ports: u16) -> u32 {
    if max_ports == 0 {
        65536
    } else {
        (u32::from(min_port) + u32::from(max_ports)).min(65536)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(dynamic: DynamicPorts) -> PortMapConfig {
        PortMapConfig {
            static_mappings: vec![
                StaticMapping::parse("kafka-1:9092,0.0.0.0:9092,b1.abc.example.com:9092").unwrap(),
            ],
            external: vec![],
            dynamic,
            listen_ip: "0.0.0.0".parse().unwrap(),
            advertised: Some(AdvertisedTemplate::parse("b<broker_id>.abc.example.com").unwrap()),
            max_dynamic: 128,
        }
    }

    fn brokers() -> Vec<(i32, BrokerAddr)> {
        vec![
            (3, BrokerAddr::new("kafka-3", 9092)),
            (1, BrokerAddr::new("kafka-1", 9092)),
            (2, BrokerAddr::new("kafka-2", 9092)),
        ]
    }

    #[test]
    fn deterministic_ports_are_min_plus_id_and_identical_across_instances() {
        let det = DynamicPorts::Deterministic {
            min_port: 9095,
            max_ports: 0,
            id_offset: 0,
        };
        let mut a = PortMap::new(config(det)).unwrap();
        let mut b = PortMap::new(config(det)).unwrap();
        let (added, errors) = a.learn(&brokers());
        assert!(errors.is_empty(), "{errors:?}");
        let mut reversed = brokers();
        reversed.reverse();
        b.learn(&reversed);
        assert_eq!(a.entries(), b.entries());
        let ports: Vec<u16> = added.iter().map(|e| e.listen.unwrap().port()).collect();
        assert_eq!(ports, vec![9097, 9098]);
        assert_eq!(
            a.advertised_for("kafka-3", 9092),
            Some(&BrokerAddr::new("b3.abc.example.com", 9098))
        );
        assert_eq!(
            a.advertised_for("kafka-1", 9092),
            Some(&BrokerAddr::new("b1.abc.example.com", 9092))
        );
        assert_eq!(a.entries()[0].node_id, Some(1));
        assert_eq!(a.advertised_for("kafka-9", 9092), None);
    }

    #[test]
    fn kafka_proxy_template_and_fixed_port() {
        let t = AdvertisedTemplate::parse("broker-{{.brokerId}}.example.com:9092").unwrap();
        assert_eq!(t.render_host(7), "broker-7.example.com");
        assert_eq!(t.port, Some(9092));
        assert!(AdvertisedTemplate::parse("x{{.Other}}").is_err());
    }

    #[test]
    fn conflicts_name_both_brokers() {
        // min 9090 + id 2 = 9092, the static listener of kafka-1.
        let mut m = PortMap::new(config(DynamicPorts::Deterministic {
            min_port: 9090,
            max_ports: 0,
            id_offset: 0,
        }))
        .unwrap();
        let (_, errors) = m.learn(&brokers());
        let text = errors
            .iter()
            .map(|e| e.to_string())
            .collect::<Vec<_>>()
            .join("; ");
        assert!(
            text.contains("kafka-1:9092") && text.contains("kafka-2:9092"),
            "{text}"
        );

        let err = PortMap::new(PortMapConfig {
            static_mappings: vec![
                StaticMapping::parse("a:9092,0.0.0.0:9092").unwrap(),
                StaticMapping::parse("b:9092,127.0.0.1:9092").unwrap(),
            ],
            ..config(DynamicPorts::Disabled)
        })
        .unwrap_err();
        assert!(
            matches!(err, PortMapError::PortConflict { port: 9092, .. }),
            "{err}"
        );
    }

    #[test]
    fn out_of_range_and_disabled() {
        let mut m = PortMap::new(config(DynamicPorts::Deterministic {
            min_port: 9095,
            max_ports: 3,
            id_offset: 0,
        }))
        .unwrap();
        let (added, errors) = m.learn(&brokers());
        assert_eq!(added.len(), 1); // id 2 -> 9097 fits; id 3 -> 9098 does not
        assert!(matches!(
            errors[0],
            PortMapError::OutOfRange { node_id: 3, .. }
        ));

        let mut m = PortMap::new(config(DynamicPorts::Deterministic {
            min_port: 65530,
            max_ports: 0,
            id_offset: 0,
        }))
        .unwrap();
        let (_, errors) = m.learn(&[(10, BrokerAddr::new("x", 1))]);
        assert!(matches!(
            errors[0],
            PortMapError::OutOfRange { node_id: 10, .. }
        ));

        let mut m = PortMap::new(config(DynamicPorts::Disabled)).unwrap();
        let (_, errors) = m.learn(&brokers());
        assert_eq!(errors.len(), 2);
        assert!(
            errors[0]
                .to_string()
                .contains("dynamic listeners are disabled")
        );
    }

    #[test]
    fn an_id_offset_keeps_large_ids_in_a_tight_range_and_is_named_when_an_id_misses_it() {
        let mut m = PortMap::new(config(DynamicPorts::Deterministic {
            min_port: 9095,
            max_ports: 3,
            id_offset: 1001,
        }))
        .unwrap();
        let ids = [1001, 1002, 1003, 1000, 1004];
        let brokers: Vec<(i32, BrokerAddr)> = ids
            .iter()
            .map(|&id| (id, BrokerAddr::new(format!("kafka-{id}"), 9092)))
            .collect();
        let (added, errors) = m.learn(&brokers);
        let ports: Vec<(Option<i32>, u16)> = added
            .iter()
            .map(|e| (e.node_id, e.listen.unwrap().port()))
            .collect();
        assert_eq!(
            ports,
            vec![(Some(1001), 9095), (Some(1002), 9096), (Some(1003), 9097)]
        );
        // Below the offset and past the range: both refused, naming the offset.
        assert_eq!(errors.len(), 2, "{errors:?}");
        for e in &errors {
            assert!(
                e.to_string().contains("--dynamic-broker-id-offset 1001"),
                "{e}"
            );
        }
    }

    #[test]
    fn sequential_fills_in_node_id_order() {
        let mut m = PortMap::new(config(DynamicPorts::Sequential {
            min_port: 9092,
            max_ports: 0,
        }))
        .unwrap();
        let (added, _) = m.learn(&brokers());
        let ports: Vec<(Option<i32>, u16)> = added
            .iter()
            .map(|e| (e.node_id, e.listen.unwrap().port()))
            .collect();
        assert_eq!(ports, vec![(Some(2), 9093), (Some(3), 9094)]);
    }

    #[test]
    fn mapping_syntax_errors() {
        assert!(StaticMapping::parse("a:1").is_err());
        assert!(StaticMapping::parse("a:1,b:2").is_err()); // listen host must be an IP
        assert!(StaticMapping::parse("a:x,0.0.0.0:2").is_err());
        let m = StaticMapping::parse("a:1,127.0.0.1:2").unwrap();
        assert_eq!(m.advertised, BrokerAddr::new("127.0.0.1", 2));
    }

    #[test]
    fn hostile_metadata_cannot_create_unbounded_listeners_or_port_zero() {
        let mut m = PortMap::new(PortMapConfig {
            max_dynamic: 2,
            ..config(DynamicPorts::Deterministic {
                min_port: 10_000,
                max_ports: 0,
                id_offset: 0,
            })
        })
        .unwrap();
        let many: Vec<(i32, BrokerAddr)> = (1..=300)
            .map(|id| (id, BrokerAddr::new(format!("kafka-x{id}"), 9092)))
            .collect();
        let (added, errors) = m.learn(&many);
        assert_eq!(added.len(), 2);
        assert_eq!(errors.len(), 298);
        assert!(
            errors.iter().all(|e| e.reason() == "too_many_dynamic"),
            "{errors:?}"
        );
        assert!(errors[0].to_string().contains("--max-dynamic-listeners 2"));

        let mut m = PortMap::new(config(DynamicPorts::Deterministic {
            min_port: 10_000,
            max_ports: 0,
            id_offset: 0,
        }))
        .unwrap();
        let (added, errors) = m.learn(&[(4, BrokerAddr::new("kafka-4", 0))]);
        assert!(added.is_empty());
        assert!(matches!(
            errors[..],
            [PortMapError::InvalidPort { node_id: 4, .. }]
        ));
    }
}
