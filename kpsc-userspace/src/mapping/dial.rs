//! `--dial-address-mapping broker_host:port,dial_host:port` (kafka-proxy's flag): a broker
//! that advertises an address the proxy node cannot reach under that name is dialled at
//! another one. Only dialling changes: the port map, rewriting and logs keep the address
//! the broker advertises, so the map stays the same on every instance.

use std::collections::HashMap;

use crate::mapping::addr::BrokerAddr;

#[derive(Clone, Debug, Default)]
pub struct DialMap {
    by_broker: HashMap<BrokerAddr, BrokerAddr>,
}

impl DialMap {
    /// Parses every `broker_host:port,dial_host:port`; a broker mapped twice is an error.
    pub fn parse<S: AsRef<str>>(mappings: &[S]) -> Result<Self, String> {
        let mut by_broker = HashMap::new();
        for text in mappings {
            let text = text.as_ref();
            let parts: Vec<&str> = text.split(',').map(str::trim).collect();
            let [broker, dial] = parts.as_slice() else {
                return Err(format!(
                    "{text:?}: expected broker_host:port,dial_host:port"
                ));
            };
            let broker = BrokerAddr::parse(broker)?;
            let dial = BrokerAddr::parse(dial)?;
            if by_broker.insert(broker.clone(), dial).is_some() {
                return Err(format!("broker {broker} is mapped twice"));
            }
        }
        Ok(Self { by_broker })
    }

    /// Where to connect to reach `broker`.
    pub fn dial_address<'a>(&'a self, broker: &'a BrokerAddr) -> &'a BrokerAddr {
        self.by_broker.get(broker).unwrap_or(broker)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kafka_proxy_syntax() {
        let map = DialMap::parse(&[
            "service-kafka-0.service-kafka-headless.service:9092,127.0.0.1:19092",
            "192.168.99.100:32402, 127.0.0.1:32402",
        ])
        .unwrap();
        let broker = BrokerAddr::new("service-kafka-0.service-kafka-headless.service", 9092);
        assert_eq!(
            map.dial_address(&broker),
            &BrokerAddr::new("127.0.0.1", 19092)
        );
        let other = BrokerAddr::new("kafka-9", 9092);
        assert_eq!(map.dial_address(&other), &other);
        assert!(DialMap::parse(&["a:1"]).is_err());
        assert!(DialMap::parse(&["a:1,b:2,c:3"]).is_err());
        assert!(DialMap::parse(&["a:1,b:x"]).is_err());
        assert!(DialMap::parse(&["a:1,b:2", "a:1,c:3"]).is_err());
    }
}
