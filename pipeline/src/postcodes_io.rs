//! Client for postcodes.io bulk reverse geocoding (`POST /postcodes`).
//!
//! Facts this client relies on (postcodes.io source and docs): at most 100
//! geolocations a request; `radius` is clamped to 2000 m; `widesearch` searches up
//! to 20 km; a geolocation with no postcode in range answers `result: null`; one
//! bad geolocation fails the whole request (400 for a non-number, 500 for out of
//! range), so only validated coordinates are sent; a global `?widesearch=` query
//! parameter turns widesearch on whatever its value, so options go per
//! geolocation in the body and the query string stays empty.
//!
//! As a [`Provider`]: batches of 100, one search stage a request; the
//! enricher paces them by the quota and retries them ([`crate::enrich`]).

use std::{collections::HashMap, time::Duration};

use futures::future::BoxFuture;
use serde::Serialize;
use serde_json::Value;

use crate::{
    geo::LatLon,
    lookup::{Area, Match, Radius, MAX_BULK_GEOLOCATIONS},
    postcode::to_pcds,
    provider::{Answer, CallError, Provider},
};

#[derive(Serialize)]
struct Geolocation {
    latitude: f64,
    longitude: f64,
    #[serde(skip_serializing_if = "Option::is_none")]
    radius: Option<f64>,
    limit: u32,
    #[serde(skip_serializing_if = "Option::is_none")]
    widesearch: Option<bool>,
}

/// A postcodes.io endpoint.
#[derive(Clone)]
pub struct PostcodesIo {
    client: reqwest::Client,
    url: String,
}

impl PostcodesIo {
    /// `base_url` like `https://api.postcodes.io`; `timeout` bounds a whole request.
    pub fn new(base_url: &str, timeout: Duration) -> Self {
        let client = reqwest::Client::builder()
            .timeout(timeout)
            .connect_timeout(Duration::from_secs(10).min(timeout))
            .user_agent(concat!("postcode-operator/", env!("CARGO_PKG_VERSION")))
            // The egress policy allows base URLs, not where they redirect to.
            .redirect(reqwest::redirect::Policy::none())
            .build()
            .expect("TLS backend available");
        Self {
            client,
            url: format!("{}/postcodes", base_url.trim_end_matches('/')),
        }
    }

    /// One bulk reverse-geocoding request for up to 100 (latitude, longitude)
    /// pairs in WGS84 degrees; answers in query order, matched by the echoed
    /// `query`, never by position alone.
    pub async fn bulk_reverse(
        &self,
        queries: &[(f64, f64)],
        radius: Radius,
    ) -> Result<Vec<Answer>, CallError> {
        assert!(
            queries.len() <= MAX_BULK_GEOLOCATIONS,
            "postcodes.io accepts at most 100 geolocations"
        );
        let geolocations: Vec<Geolocation> = queries
            .iter()
            .map(|&(lat, lon)| match radius {
                Radius::Metres(m) => Geolocation {
                    latitude: lat,
                    longitude: lon,
                    radius: Some(m),
                    limit: 1,
                    widesearch: None,
                },
                Radius::Widesearch => Geolocation {
                    latitude: lat,
                    longitude: lon,
                    radius: None,
                    limit: 1,
                    widesearch: Some(true),
                },
            })
            .collect();
        let body = serde_json::json!({ "geolocations": geolocations });
        let resp = self
            .client
            .post(&self.url)
            .json(&body)
            .send()
            .await
            .map_err(|e| CallError::Transient(describe(&e)))?;
        let status = resp.status();
        if status.as_u16() == 429 {
            let retry_after = resp
                .headers()
                .get(reqwest::header::RETRY_AFTER)
                .and_then(|v| v.to_str().ok())
                .and_then(|s| s.trim().parse::<f64>().ok())
                .filter(|s| s.is_finite() && *s >= 0.0)
                .map(|s| Duration::from_secs_f64(s.min(3600.0)));
            return Err(CallError::Throttled { retry_after });
        }
        let text = resp
            .text()
            .await
            .map_err(|e| CallError::Transient(describe(&e)))?;
        if status.is_server_error() {
            return Err(CallError::Transient(format!("HTTP {status}: {}", snippet(&text))));
        }
        if !status.is_success() {
            return Err(CallError::Permanent(format!("HTTP {status}: {}", snippet(&text))));
        }
        parse_bulk(&text, queries)
    }
}

impl Provider for PostcodesIo {
    fn name(&self) -> String {
        format!("postcodes.io at {}", self.url.trim_end_matches("/postcodes"))
    }

    fn batch_size(&self) -> usize {
        MAX_BULK_GEOLOCATIONS
    }

    fn answers_locally(&self) -> bool {
        false
    }

    fn answer<'a>(
        &'a self,
        at: &'a [LatLon],
        radius: Radius,
    ) -> BoxFuture<'a, Result<Vec<Answer>, CallError>> {
        let queries: Vec<(f64, f64)> = at.iter().map(|p| (p.lat, p.lon)).collect();
        Box::pin(async move { self.bulk_reverse(&queries, radius).await })
    }
}

fn describe(e: &reqwest::Error) -> String {
    let kind = if e.is_timeout() {
        "timeout"
    } else if e.is_connect() {
        "connection failed"
    } else if e.is_body() || e.is_decode() {
        "response body failed"
    } else {
        "request failed"
    };
    let mut msg = format!("{kind}: {e}");
    let mut src = std::error::Error::source(e);
    while let Some(s) = src {
        msg.push_str(&format!(": {s}"));
        src = s.source();
    }
    msg
}

fn snippet(text: &str) -> String {
    let t: String = text.chars().take(200).collect();
    t.replace('\n', " ")
}

fn number(v: &Value) -> Option<f64> {
    match v {
        Value::Number(n) => n.as_f64(),
        Value::String(s) => s.trim().parse().ok(),
        _ => None,
    }
}

fn key(lat: f64, lon: f64) -> (u64, u64) {
    ((lat + 0.0).to_bits(), (lon + 0.0).to_bits())
}

/// Parses a bulk response body into answers in query order.
pub fn parse_bulk(text: &str, queries: &[(f64, f64)]) -> Result<Vec<Answer>, CallError> {
    let malformed =
        |why: &str| CallError::Transient(format!("malformed response ({why}): {}", snippet(text)));
    let v: Value = serde_json::from_str(text).map_err(|e| malformed(&e.to_string()))?;
    let items = v
        .get("result")
        .and_then(Value::as_array)
        .ok_or_else(|| malformed("no result array"))?;
    let mut index: HashMap<(u64, u64), usize> = HashMap::with_capacity(queries.len());
    for (i, &(lat, lon)) in queries.iter().enumerate() {
        index.insert(key(lat, lon), i);
    }
    let mut answers = vec![Answer::Missing; queries.len()];
    for item in items {
        let q = item
            .get("query")
            .ok_or_else(|| malformed("result without query"))?;
        let (Some(lat), Some(lon)) = (
            q.get("latitude").and_then(number),
            q.get("longitude").and_then(number),
        ) else {
            return Err(malformed("query without latitude/longitude"));
        };
        // Exact match on the echoed numbers; a server that re-formats numbers may
        // be off in the last bits, so fall back to the nearest query within 1e-9°.
        let i = match index.get(&key(lat, lon)) {
            Some(&i) => i,
            None => match queries
                .iter()
                .enumerate()
                .filter(|(_, &(qa, qo))| (qa - lat).abs() < 1e-9 && (qo - lon).abs() < 1e-9)
                .min_by(|a, b| {
                    ((a.1 .0 - lat).abs() + (a.1 .1 - lon).abs())
                        .total_cmp(&((b.1 .0 - lat).abs() + (b.1 .1 - lon).abs()))
                }) {
                Some((i, _)) => i,
                None => continue,
            },
        };
        answers[i] = match item.get("result") {
            None | Some(Value::Null) => Answer::NoPostcode,
            Some(Value::Array(list)) if list.is_empty() => Answer::NoPostcode,
            Some(Value::Array(list)) => {
                Answer::Found(to_match(&list[0]).ok_or_else(|| malformed("result without postcode"))?)
            }
            Some(_) => return Err(malformed("result is not a list")),
        };
    }
    Ok(answers)
}

/// Converts a postcodes.io postcode object into a [`Match`]: the area's names
/// from its fields, their codes from its `codes` object (absent ones `None`).
pub fn to_match(obj: &Value) -> Option<Match> {
    let postcode = to_pcds(obj.get("postcode")?.as_str()?)?;
    let distance_m = obj.get("distance").and_then(number).unwrap_or(0.0);
    let s = |k: &str| obj.get(k).and_then(Value::as_str).map(str::to_string);
    // postcodes.io's `codes`: the GSS codes of the named areas.
    let code = |k: &str| {
        obj.get("codes")
            .and_then(|c| c.get(k))
            .and_then(Value::as_str)
            .map(str::to_string)
    };
    let area = Area {
        outcode: s("outcode"),
        incode: s("incode"),
        country: s("country"),
        region: s("region"),
        admin_district: s("admin_district"),
        admin_county: s("admin_county"),
        admin_ward: s("admin_ward"),
        parish: s("parish"),
        parliamentary_constituency: s("parliamentary_constituency_2024")
            .or_else(|| s("parliamentary_constituency")),
        lsoa: s("lsoa"),
        msoa: s("msoa"),
        admin_district_code: code("admin_district"),
        admin_county_code: code("admin_county"),
        admin_ward_code: code("admin_ward"),
        parish_code: code("parish"),
        parliamentary_constituency_code: code("parliamentary_constituency_2024")
            .or_else(|| code("parliamentary_constituency")),
        lsoa_code: code("lsoa"),
        msoa_code: code("msoa"),
    };
    Some(Match {
        postcode,
        distance_m,
        area,
        raw: Some(obj.to_string()),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn answers_are_matched_by_echoed_query_not_position() {
        let body = r#"{"status":200,"result":[
            {"query":{"latitude":2.5,"longitude":3},"result":null},
            {"query":{"latitude":"1","longitude":"-0.5"},"result":[{"postcode":"ab101aa","distance":12.5,"outcode":"AB10","incode":"1AA","country":"Scotland"}]}
        ]}"#;
        let a = parse_bulk(body, &[(1.0, -0.5), (2.5, 3.0), (4.0, 4.0)]).unwrap();
        match &a[0] {
            Answer::Found(m) => {
                assert_eq!(m.postcode, "AB10 1AA");
                assert_eq!(m.distance_m, 12.5);
                assert_eq!(m.area.country.as_deref(), Some("Scotland"));
            }
            other => panic!("{other:?}"),
        }
        assert_eq!(a[1], Answer::NoPostcode);
        assert_eq!(a[2], Answer::Missing);
    }

    #[test]
    fn codes_are_read_from_the_codes_object() {
        let obj = serde_json::json!({"postcode": "AB10 1AA", "distance": 1.5, "admin_ward": "Ward A",
            "lsoa": "L 001A", "codes": {"admin_ward": "S13002842", "lsoa": "S01006646",
            "parliamentary_constituency": "S14000001", "parliamentary_constituency_2024": "S14000060",
            "admin_county": "S99999999"}});
        let m = to_match(&obj).unwrap();
        assert_eq!(m.area.admin_ward.as_deref(), Some("Ward A"));
        assert_eq!(m.area.admin_ward_code.as_deref(), Some("S13002842"));
        assert_eq!(m.area.lsoa_code.as_deref(), Some("S01006646"));
        assert_eq!(
            m.area.parliamentary_constituency_code.as_deref(),
            Some("S14000060")
        );
        assert_eq!(m.area.admin_county_code.as_deref(), Some("S99999999"));
        assert_eq!((m.area.admin_county, m.area.msoa_code), (None, None));
    }

    #[test]
    fn long_decimals_round_trip_through_the_echo() {
        let q: Vec<(f64, f64)> = (0..100)
            .map(|k| {
                (
                    51.3 + f64::from(k) * 0.01 + 0.00002 * f64::from(k / 7),
                    -0.4 + f64::from(k) * 0.0103,
                )
            })
            .collect();
        let items: Vec<serde_json::Value> = q
            .iter()
            .map(|&(la, lo)| serde_json::json!({"query": {"latitude": la, "longitude": lo}, "result": null}))
            .collect();
        let body = serde_json::json!({"status": 200, "result": items}).to_string();
        let a = parse_bulk(&body, &q).unwrap();
        assert!(a.iter().all(|x| *x == Answer::NoPostcode));
        // a server printing fewer digits still matches its query
        #[allow(clippy::excessive_precision)]
        let a = parse_bulk(r#"{"status":200,"result":[{"query":{"latitude":51.30002000000001,"longitude":-0.4},"result":null}]}"#, &[(51.300020000000004, -0.4)]).unwrap();
        assert_eq!(a[0], Answer::NoPostcode);
    }

    #[test]
    fn garbage_and_truncated_bodies_are_transient() {
        assert!(matches!(
            parse_bulk("<html>", &[(1.0, 1.0)]),
            Err(CallError::Transient(_))
        ));
        assert!(matches!(
            parse_bulk(r#"{"status":200,"result":[{"query""#, &[(1.0, 1.0)]),
            Err(CallError::Transient(_))
        ));
        assert!(matches!(
            parse_bulk(r#"{"status":200}"#, &[(1.0, 1.0)]),
            Err(CallError::Transient(_))
        ));
    }
}
