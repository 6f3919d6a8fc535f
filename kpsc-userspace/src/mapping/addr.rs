//! Addresses as operators write them (kafka-proxy's mapping syntax) and as brokers
//! advertise them.

use std::{
    fmt,
    net::{IpAddr, Ipv4Addr, SocketAddr},
};

use serde::Serialize;

/// A `host:port` as brokers advertise it (host may be a name).
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
pub struct BrokerAddr {
    pub host: String,
    pub port: u16,
}

impl BrokerAddr {
    pub fn new(host: impl Into<String>, port: u16) -> Self {
        Self {
            host: host.into(),
            port,
        }
    }

    /// Parses `host:port`, `[v6]:port`.
    pub fn parse(text: &str) -> Result<Self, String> {
        let text = text.trim();
        let (host, port) = text
            .rsplit_once(':')
            .ok_or_else(|| format!("{text:?}: expected host:port"))?;
        let host = host.trim_start_matches('[').trim_end_matches(']');
        if host.is_empty() {
            return Err(format!("{text:?}: empty host"));
        }
        let port: u16 = port
            .parse()
            .map_err(|_| format!("{text:?}: {port:?} is not a port number"))?;
        if port == 0 {
            return Err(format!("{text:?}: port 0 is not allowed"));
        }
        Ok(Self::new(host, port))
    }
}

impl BrokerAddr {
    /// The same address in one spelling, for comparing what brokers advertise with what
    /// the map expects: brackets around an IPv6 host dropped (some brokers advertise
    /// `[2001:db8::1]` as the host) and IP literals in their canonical form.
    pub fn normalized(&self) -> Self {
        let host = self.host.trim_start_matches('[').trim_end_matches(']');
        let host = match host.parse::<IpAddr>() {
            Ok(ip) => ip.to_string(),
            Err(_) => host.to_owned(),
        };
        Self::new(host, self.port)
    }
}

impl fmt::Display for BrokerAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.host.contains(':') {
            write!(f, "[{}]:{}", self.host, self.port)
        } else {
            write!(f, "{}:{}", self.host, self.port)
        }
    }
}

/// `--bootstrap-server-mapping broker_host:port,listen_host:port[,advertised_host:port]`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StaticMapping {
    pub broker: BrokerAddr,
    pub listen: SocketAddr,
    pub advertised: BrokerAddr,
}

impl StaticMapping {
    pub fn parse(text: &str) -> Result<Self, String> {
        let parts: Vec<&str> = text.split(',').map(str::trim).collect();
        let (broker, listen, advertised) = match parts.as_slice() {
            [b, l] => (*b, *l, None),
            [b, l, a] => (*b, *l, Some(*a)),
            _ => {
                return Err(format!(
                    "{text:?}: expected broker_host:port,listen_host:port[,advertised_host:port]"
                ));
            }
        };
        let broker = BrokerAddr::parse(broker)?;
        let listen_addr = BrokerAddr::parse(listen)?;
        let listen_ip: IpAddr = if listen_addr.host == "localhost" {
            IpAddr::V4(Ipv4Addr::LOCALHOST)
        } else {
            listen_addr.host.parse().map_err(|_| {
                format!(
                    "{text:?}: listen host {:?} must be an IP address",
                    listen_addr.host
                )
            })?
        };
        let listen = SocketAddr::new(listen_ip, listen_addr.port);
        let advertised = match advertised {
            Some(a) => BrokerAddr::parse(a)?,
            None => listen_addr,
        };
        Ok(Self {
            broker,
            listen,
            advertised,
        })
    }
}

/// `--dynamic-advertised-listener HOST[:PORT]` with `{{.brokerId}}` / `<broker_id>` in HOST.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AdvertisedTemplate {
    pub host: String,
    pub port: Option<u16>,
}

const BROKER_ID_PLACEHOLDERS: [&str; 2] = ["{{.brokerId}}", "<broker_id>"];

impl AdvertisedTemplate {
    pub fn parse(text: &str) -> Result<Self, String> {
        let text = text.trim();
        if text.is_empty() {
            return Err("empty advertised listener".into());
        }
        // A trailing `:digits` is a fixed port; anything else belongs to the host.
        let (host, port) = match text.rsplit_once(':') {
            Some((h, p)) if !p.is_empty() && p.bytes().all(|b| b.is_ascii_digit()) => {
                let port: u16 = p
                    .parse()
                    .map_err(|_| format!("{text:?}: {p:?} is not a port number"))?;
                (h, Some(port))
            }
            _ => (text, None),
        };
        if host.contains("{{") && !host.contains(BROKER_ID_PLACEHOLDERS[0]) {
            return Err(format!(
                "{text:?}: the only template field is {{{{.brokerId}}}}"
            ));
        }
        Ok(Self {
            host: host.to_owned(),
            port,
        })
    }

    pub fn render_host(&self, node_id: i32) -> String {
        let id = node_id.to_string();
        BROKER_ID_PLACEHOLDERS
            .iter()
            .fold(self.host.clone(), |h, p| h.replace(p, &id))
    }
}
