//! `--proxy-listener-tls-required-client-subject`, with kafka-proxy's syntax and meaning:
//! `s:/CN=[alice]/O=[Example]` requires those exact values (a field with several values,
//! e.g. `OU=[a,b]`, must hold exactly those, in any order); `r:/CN=[^kafka-.*$]` matches
//! each of the field's values, in certificate order, against one regular expression each.
//! Fields: CN, C, L, O, OU, S (state or province). The flag is repeatable: a client
//! certificate must satisfy one of the subjects. Only the client's own (leaf) certificate
//! is checked, never its issuers.

use std::fmt;

use regex::Regex;
use x509_parser::{
    oid_registry::{
        OID_X509_COMMON_NAME, OID_X509_COUNTRY_NAME, OID_X509_LOCALITY_NAME,
        OID_X509_ORGANIZATION_NAME, OID_X509_ORGANIZATIONAL_UNIT, OID_X509_STATE_OR_PROVINCE_NAME,
        Oid,
    },
    x509::X509Name,
};

/// The subject fields kafka-proxy checks, by its names.
const FIELDS: &[&str] = &["CN", "C", "L", "O", "OU", "S"];

fn oid(field: &str) -> Oid<'static> {
    match field {
        "CN" => OID_X509_COMMON_NAME,
        "C" => OID_X509_COUNTRY_NAME,
        "L" => OID_X509_LOCALITY_NAME,
        "O" => OID_X509_ORGANIZATION_NAME,
        "OU" => OID_X509_ORGANIZATIONAL_UNIT,
        _ => OID_X509_STATE_OR_PROVINCE_NAME,
    }
}

#[derive(Debug)]
enum Expected {
    Exact(Vec<String>),
    Patterns(Vec<Regex>),
}

/// One required subject.
#[derive(Debug)]
pub struct RequiredSubject {
    text: String,
    fields: Vec<(&'static str, Expected)>,
}

impl fmt::Display for RequiredSubject {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.text)
    }
}

impl RequiredSubject {
    pub fn parse(text: &str) -> Result<Self, String> {
        let (patterns, rest) = match text.get(..2) {
            Some("s:") => (false, &text[2..]),
            Some("r:") => (true, &text[2..]),
            _ => {
                return Err(format!(
                    "{text:?}: must start with s: (exact values) or r: (patterns)"
                ));
            }
        };
        let mut fields = Vec::new();
        let mut chars = rest.char_indices();
        while let Some((at, c)) = chars.next() {
            if c != '/' {
                return Err(format!("{text:?}: expected / at {}", at + 2));
            }
            let mut key = String::new();
            loop {
                match chars.next() {
                    Some((_, '=')) => break,
                    Some((_, c)) if c.is_ascii_uppercase() => key.push(c),
                    _ => return Err(format!("{text:?}: expected FIELD= after /")),
                }
            }
            let field = FIELDS
                .iter()
                .find(|f| **f == key)
                .ok_or_else(|| format!("{text:?}: unknown field {key:?} (one of {FIELDS:?})"))?;
            if chars.next().map(|(_, c)| c) != Some('[') {
                return Err(format!("{text:?}: the value of {key} must be in [...]"));
            }
            let values = read_values(&mut chars)
                .ok_or_else(|| format!("{text:?}: the value of {key} has no closing ]"))?;
            let expected = if patterns {
                let regexes = values
                    .iter()
                    .map(|v| Regex::new(v).map_err(|e| format!("{text:?}: {key}: {e}")))
                    .collect::<Result<_, _>>()?;
                Expected::Patterns(regexes)
            } else {
                let mut values = values;
                values.sort();
                Expected::Exact(values)
            };
            fields.push((*field, expected));
        }
        if fields.is_empty() {
            return Err(format!("{text:?}: names no field, e.g. s:/CN=[client]"));
        }
        Ok(Self {
            text: text.to_owned(),
            fields,
        })
    }

    /// Whether a certificate with this subject satisfies every field.
    pub fn matches(&self, subject: &X509Name<'_>) -> bool {
        self.fields.iter().all(|(field, expected)| {
            let oid = oid(field);
            let values: Vec<&str> = subject
                .iter_by_oid(&oid)
                .filter_map(|attr| attr.as_str().ok())
                .collect();
            match expected {
                Expected::Exact(want) => {
                    let mut got = values;
                    got.sort_unstable();
                    got == *want
                }
                Expected::Patterns(want) => {
                    want.len() == values.len()
                        && want.iter().zip(&values).all(|(re, v)| re.is_match(v))
                }
            }
        })
    }
}

/// The comma-separated values up to the `]` closing the field's `[`; a comma inside a
/// nested `[...]` or `{...}` belongs to a pattern. None when the `]` never comes.
fn read_values(chars: &mut impl Iterator<Item = (usize, char)>) -> Option<Vec<String>> {
    let mut values = Vec::new();
    let mut current = String::new();
    let (mut nest, mut brace) = (1usize, false);
    for (_, c) in chars.by_ref() {
        match c {
            '[' => nest += 1,
            ']' if nest == 1 => {
                if !current.is_empty() {
                    values.push(current);
                }
                return Some(values);
            }
            ']' => nest -= 1,
            '{' => brace = true,
            '}' => brace = false,
            ',' if nest == 1 && !brace => {
                values.push(std::mem::take(&mut current));
                continue;
            }
            _ => {}
        }
        current.push(c);
    }
    None
}

#[cfg(test)]
mod tests {
    use rcgen::{CertificateParams, DnType, KeyPair};

    use super::*;

    fn subject_of(dn: &[(DnType, &str)]) -> Vec<u8> {
        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
        for (t, v) in dn {
            params.distinguished_name.push(t.clone(), *v);
        }
        params
            .self_signed(&KeyPair::generate().unwrap())
            .unwrap()
            .der()
            .to_vec()
    }

    fn matches(required: &str, der: &[u8]) -> bool {
        let (_, cert) = x509_parser::parse_x509_certificate(der).unwrap();
        RequiredSubject::parse(required)
            .unwrap()
            .matches(cert.subject())
    }

    #[test]
    fn kafka_proxy_forms_match_as_it_does() {
        let der = subject_of(&[
            (DnType::CommonName, "changefeed-1"),
            (DnType::OrganizationName, "Example"),
            (DnType::CountryName, "DE"),
            (DnType::StateOrProvinceName, "Berlin"),
        ]);
        assert!(matches("s:/CN=[changefeed-1]", &der));
        assert!(matches(
            "s:/CN=[changefeed-1]/O=[Example]/C=[DE]/S=[Berlin]",
            &der
        ));
        assert!(!matches("s:/CN=[changefeed-2]", &der));
        assert!(!matches("s:/CN=[changefeed-1]/O=[Other]", &der));
        // A field the certificate lacks has no values: it matches only an empty list.
        assert!(!matches("s:/OU=[ops]", &der));
        assert!(matches("r:/CN=[^changefeed-\\d$]/C=[D.]", &der));
        assert!(!matches("r:/CN=[^changefeed-\\d{2}$]", &der));
        // A comma inside a pattern's {...} or [...] is part of it.
        assert!(matches("r:/CN=[^changefeed-[0-9,a]{1,3}$]", &der));
    }

    #[test]
    fn malformed_subjects_are_refused_with_the_reason() {
        for (text, why) in [
            ("CN=[x]", "must start with"),
            ("s:CN=[x]", "expected /"),
            ("s:/XX=[x]", "unknown field"),
            ("s:/CN=x", "must be in [...]"),
            ("s:/CN=[x", "no closing ]"),
            ("s:", "names no field"),
            ("r:/CN=[(]", "CN"),
        ] {
            let err = RequiredSubject::parse(text).unwrap_err();
            assert!(err.contains(why), "{text}: {err}");
        }
    }
}
