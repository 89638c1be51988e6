//! A postcodes.io-compatible HTTP server for tests and benchmarks, answering
//! from the offline index, with fault injection and request accounting.
//!
//! Endpoints as postcodes.io: `POST /postcodes` (bulk reverse geocoding, at most
//! 100 geolocations; `limit`, `radius` and `widesearch` may also come as query
//! parameters, a geolocation's own overriding them), `GET /postcodes?lon=&lat=`
//! (single; also `longitude=&latitude=`). Distances, order and widesearch are
//! the offline index's, which are postcodes.io's ([`pipeline::offline`]).
//! Parameters are read as postcodes.io's `nearestPostcodes` reads them
//! (JavaScript): a parameter that is absent or falsy (`0`, `""`, `false`,
//! `null`) takes its default (radius 100 m, limit 10); `limit` is
//! `parseInt`ed and `radius`/coordinates `parseFloat`ed (a numeric prefix of a
//! string counts), 400 when that gives no number; radius above 2000 m is
//! 2000 m, limit above 100 is 100 (widesearch: 10); a limit of `"0"` answers
//! `null` and a negative one 500 (PostgreSQL refuses `LIMIT -1`); a
//! coordinate out of range answers `null` with 200. `result: null` when
//! nothing is found. Test endpoints: `GET /__stats`, `PUT /__faults`.
//!
//! In a test, [`TestServer::start`] runs it on a loopback port of the test's
//! own runtime; the `postcodes-io-test-server` binary runs it as a process.

use std::{
    collections::{BTreeMap, HashMap, VecDeque},
    net::SocketAddr,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use axum::{
    body::Body,
    extract::{Query, State},
    http::{header, StatusCode},
    response::{IntoResponse, Response},
    routing::{get, post, put},
    Json, Router,
};
use rand::{RngExt, SeedableRng};
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

use pipeline::{
    geo::LatLon,
    lookup::{MAX_API_RADIUS_M, MAX_BULK_GEOLOCATIONS},
    offline::{Nearest, OfflineIndex, WIDESEARCH_COUNT},
    postcode::outcode_incode,
};

/// Faults to inject; probabilities are per request, checked in field order.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct Faults {
    /// Answer 429 when this many requests were accepted in the last second.
    pub rate_limit: Option<u32>,
    /// `Retry-After` seconds sent with a 429 (none when `None`).
    pub retry_after_s: Option<u32>,
    pub p_500: f64,
    pub p_502: f64,
    pub p_503: f64,
    /// 200 with a non-JSON body.
    pub p_garbage: f64,
    /// 200 with the JSON cut in half.
    pub p_truncated: f64,
    /// Reset the connection after the headers.
    pub p_reset: f64,
    /// Drop the last answer of the result list.
    pub p_fewer: f64,
    /// Answer in reverse order.
    pub p_reorder: f64,
    /// Delay an answer by `slow_ms`.
    pub p_slow: f64,
    pub slow_ms: u64,
    /// Fates of the next requests, in order, before any probability is rolled:
    /// `"429"`, `"500"`, `"502"`, `"503"`, `"garbage"`, `"truncated"`, `"reset"`,
    /// `"fewer"`, `"reorder"`, `"slow"`, `"ok"`.
    pub script: Vec<String>,
    /// Capacity mode: work on at most this many coordinates per second, as a
    /// slow postcodes.io does (its stock settings on this machine: about 10).
    /// Requests queue in arrival order; a request of n coordinates takes n/C
    /// seconds of the server once its turn comes, and is worked on to the end
    /// even when its client has given up (the real server's query keeps
    /// running), which [`Stats::wasted_coordinates`] counts.
    pub capacity: Option<u32>,
}

/// What the server has seen.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Stats {
    pub requests: u64,
    /// Responses by HTTP status (a reset counts as 0).
    pub by_status: BTreeMap<u16, u64>,
    /// Geolocations asked in bulk requests.
    pub geolocations: u64,
    /// The largest number of requests that arrived within any one-second window.
    pub max_per_second: u64,
    /// Bulk requests answered 200 whose every geolocation had been answered 200 before at the same radius.
    pub repeated_batches: u64,
    /// (latitude, longitude, radius) answered 200 more than once.
    pub repeated_queries: u64,
    /// Bulk requests answered 200, by the search radius of their first geolocation in metres.
    pub answered_by_radius: BTreeMap<String, u64>,
    /// Every request: (seconds since the server started, HTTP status; 0 for a reset).
    pub log: Vec<(f64, u16)>,
    /// Capacity mode: coordinates the server worked on (every geolocation of
    /// every bulk request it accepted).
    pub worked_coordinates: u64,
    /// Capacity mode: of those, coordinates of requests whose client had
    /// given up (closed the connection) before the answer was ready.
    pub wasted_coordinates: u64,
    /// Capacity mode: the busiest second, as the most coordinates of requests
    /// whose work ended within one second (a request's coordinates count when
    /// it ends, so one full request of 100 makes 100), and the most requests
    /// queued or in work at once.
    pub busiest_second_coordinates: u64,
    pub max_queued_requests: u64,
    /// Arrival time of every request, seconds since the server started.
    pub arrivals: Vec<f64>,
}

struct Inner {
    /// Capacity mode: when the server's queue of work runs dry (since start, s).
    busy_until: f64,
    /// Capacity mode: (end of work, coordinates) of every request worked on.
    work_ends: Vec<(f64, u64)>,
    faults: Faults,
    stats: Stats,
    started: Instant,
    arrivals: Vec<f64>,
    accepted: VecDeque<Instant>,
    answered: HashMap<(u64, u64, u64), u32>,
    rng: rand::rngs::StdRng,
}

/// Shared state of a running server.
#[derive(Clone)]
pub struct ServerState {
    index: Arc<OfflineIndex>,
    inner: Arc<Mutex<Inner>>,
}

impl ServerState {
    pub fn new(index: Arc<OfflineIndex>, faults: Faults, seed: u64) -> Self {
        let inner = Inner {
            busy_until: 0.0,
            work_ends: Vec::new(),
            faults,
            stats: Stats::default(),
            started: Instant::now(),
            arrivals: Vec::new(),
            accepted: VecDeque::new(),
            answered: HashMap::new(),
            rng: rand::rngs::StdRng::seed_from_u64(seed),
        };
        Self {
            index,
            inner: Arc::new(Mutex::new(inner)),
        }
    }

    /// A snapshot of the statistics, with `max_per_second` computed over all arrivals.
    pub fn stats(&self) -> Stats {
        let g = self.inner.lock().expect("server state");
        let mut s = g.stats.clone();
        let a = &g.arrivals;
        let mut j = 0;
        let mut best = 0;
        for i in 0..a.len() {
            while a[i] - a[j] >= 1.0 {
                j += 1;
            }
            best = best.max(i - j + 1);
        }
        s.max_per_second = best as u64;
        s.arrivals = a.clone();
        s.busiest_second_coordinates = busiest_second(&g.work_ends);
        s
    }

    pub fn set_faults(&self, faults: Faults) {
        self.inner.lock().expect("server state").faults = faults;
    }

    /// Capacity mode: books `n` coordinates of work in the queue and returns
    /// when it ends; `None` without a capacity.
    fn book_work(&self, n: u64) -> Option<Instant> {
        let mut g = self.inner.lock().expect("server state");
        let capacity = f64::from(g.faults.capacity?.max(1));
        let now = g.started.elapsed().as_secs_f64();
        let end = g.busy_until.max(now) + n as f64 / capacity;
        g.busy_until = end;
        g.work_ends.push((end, n));
        g.stats.worked_coordinates += n;
        // Queued or in work: booked and not ended, whether or not its client still waits.
        let queued = g.work_ends.iter().filter(|(e, _)| *e > now).count() as u64;
        g.stats.max_queued_requests = g.stats.max_queued_requests.max(queued);
        Some(g.started + Duration::from_secs_f64(end))
    }

    /// Capacity mode: a booked request's handler ended, answered or given up by its client.
    fn work_done(&self, n: u64, given_up: bool) {
        let mut g = self.inner.lock().expect("server state");
        if given_up {
            g.stats.wasted_coordinates += n;
        }
    }
}

/// The most coordinates of `ends` ((end time, coordinates)) within any one-second window.
fn busiest_second(ends: &[(f64, u64)]) -> u64 {
    let mut e = ends.to_vec();
    e.sort_by(|a, b| a.0.total_cmp(&b.0));
    let (mut j, mut sum, mut best) = (0, 0u64, 0u64);
    for &(end, n) in &e {
        sum += n;
        while end - e[j].0 >= 1.0 {
            sum -= e[j].1;
            j += 1;
        }
        best = best.max(sum);
    }
    best
}

/// Capacity mode: a booked request; dropped before [`Work::finish`] (its
/// client closed the connection, so the handler was cancelled) its work
/// counts as wasted.
struct Work {
    state: ServerState,
    n: u64,
    done: bool,
}

impl Work {
    fn finish(mut self) {
        self.done = true;
        self.state.work_done(self.n, false);
    }
}

impl Drop for Work {
    fn drop(&mut self) {
        if !self.done {
            self.state.work_done(self.n, true);
        }
    }
}

/// The decision for one request.
enum Fate {
    Throttle(Option<u32>),
    Status(StatusCode),
    Garbage,
    Truncated,
    Reset,
    Answer {
        fewer: bool,
        reorder: bool,
        slow: Option<Duration>,
    },
}

fn decide(state: &ServerState) -> Fate {
    let mut g = state.inner.lock().expect("server state");
    let now = Instant::now();
    let t = now.duration_since(g.started).as_secs_f64();
    g.arrivals.push(t);
    g.stats.requests += 1;
    let f = g.faults.clone();
    if !g.faults.script.is_empty() {
        let next = g.faults.script.remove(0);
        return match next.as_str() {
            "429" => Fate::Throttle(f.retry_after_s),
            "500" => Fate::Status(StatusCode::INTERNAL_SERVER_ERROR),
            "502" => Fate::Status(StatusCode::BAD_GATEWAY),
            "503" => Fate::Status(StatusCode::SERVICE_UNAVAILABLE),
            "garbage" => Fate::Garbage,
            "truncated" => Fate::Truncated,
            "reset" => Fate::Reset,
            "fewer" => Fate::Answer {
                fewer: true,
                reorder: false,
                slow: None,
            },
            "reorder" => Fate::Answer {
                fewer: false,
                reorder: true,
                slow: None,
            },
            "slow" => Fate::Answer {
                fewer: false,
                reorder: false,
                slow: Some(Duration::from_millis(f.slow_ms)),
            },
            _ => Fate::Answer {
                fewer: false,
                reorder: false,
                slow: None,
            },
        };
    }
    if let Some(limit) = f.rate_limit {
        while g
            .accepted
            .front()
            .is_some_and(|&a| now.duration_since(a) >= Duration::from_secs(1))
        {
            g.accepted.pop_front();
        }
        if g.accepted.len() >= limit as usize {
            return Fate::Throttle(f.retry_after_s);
        }
        g.accepted.push_back(now);
    }
    let mut roll = |p: f64| p > 0.0 && g.rng.random::<f64>() < p;
    if roll(f.p_500) {
        return Fate::Status(StatusCode::INTERNAL_SERVER_ERROR);
    }
    if roll(f.p_502) {
        return Fate::Status(StatusCode::BAD_GATEWAY);
    }
    if roll(f.p_503) {
        return Fate::Status(StatusCode::SERVICE_UNAVAILABLE);
    }
    if roll(f.p_garbage) {
        return Fate::Garbage;
    }
    if roll(f.p_truncated) {
        return Fate::Truncated;
    }
    if roll(f.p_reset) {
        return Fate::Reset;
    }
    let fewer = roll(f.p_fewer);
    let reorder = roll(f.p_reorder);
    let slow = roll(f.p_slow).then(|| Duration::from_millis(f.slow_ms));
    Fate::Answer { fewer, reorder, slow }
}

fn count_status(state: &ServerState, code: u16) {
    let mut g = state.inner.lock().expect("server state");
    *g.stats.by_status.entry(code).or_default() += 1;
    let t = g.started.elapsed().as_secs_f64();
    g.stats.log.push((t, code));
}

fn error_body(code: StatusCode, msg: &str) -> Response {
    (code, Json(json!({"status": code.as_u16(), "error": msg}))).into_response()
}

/// A postcodes.io postcode object for an offline answer: its area names and,
/// under `codes`, their codes as postcodes.io gives them (its `toJson` in
/// `app/models/postcode.ts`) when the postcode file has area data
/// ([`OfflineIndex::area`]); `null` names and empty `codes` when not.
fn postcode_json(index: &OfflineIndex, n: &Nearest<'_>) -> Value {
    let (out, inc) = outcode_incode(n.postcode);
    let a = index.area(n);
    let codes = if index.has_areas() {
        json!({
            "admin_district": a.admin_district_code, "admin_county": a.admin_county_code,
            "admin_ward": a.admin_ward_code, "parish": a.parish_code,
            "parliamentary_constituency": a.parliamentary_constituency_code,
            "parliamentary_constituency_2024": a.parliamentary_constituency_code,
            "lsoa": a.lsoa_code, "msoa": a.msoa_code
        })
    } else {
        json!({})
    };
    json!({
        "postcode": n.postcode, "quality": 1, "eastings": null, "northings": null, "country": a.country,
        "nhs_ha": null, "longitude": n.centroid.lon, "latitude": n.centroid.lat,
        "european_electoral_region": null, "primary_care_trust": null, "region": a.region, "lsoa": a.lsoa,
        "msoa": a.msoa, "incode": inc, "outcode": out, "parliamentary_constituency": a.parliamentary_constituency,
        "parliamentary_constituency_2024": a.parliamentary_constituency, "admin_district": a.admin_district,
        "parish": a.parish, "admin_county": a.admin_county, "date_of_introduction": null,
        "admin_ward": a.admin_ward, "ced": null, "ccg": null, "nuts": null, "pfa": null, "codes": codes,
        "distance": n.distance_m
    })
}

/// JavaScript's truthiness of a JSON value (absent is falsy).
fn truthy(v: Option<&Value>) -> bool {
    match v {
        None | Some(Value::Null) => false,
        Some(Value::Bool(b)) => *b,
        Some(Value::Number(n)) => n.as_f64().is_some_and(|x| x != 0.0),
        Some(Value::String(s)) => !s.is_empty(),
        Some(_) => true,
    }
}

/// `String(v)` for the values `parseInt`/`parseFloat` are given.
fn js_string(v: &Value) -> String {
    match v {
        Value::String(s) => s.clone(),
        other => other.to_string(),
    }
}

/// The longest prefix of `s` (after leading white space) that is a decimal
/// number, as JavaScript's `parseFloat`; `None` for its `NaN`.
fn parse_float(s: &str) -> Option<f64> {
    let t = s.trim_start();
    let b = t.as_bytes();
    let mut i = usize::from(matches!(b.first(), Some(b'+' | b'-')));
    if t[i..].starts_with("Infinity") {
        return Some(if b[0] == b'-' {
            f64::NEG_INFINITY
        } else {
            f64::INFINITY
        });
    }
    let digits = |i: &mut usize| {
        let from = *i;
        while b.get(*i).is_some_and(u8::is_ascii_digit) {
            *i += 1;
        }
        *i - from
    };
    let mut n = digits(&mut i);
    if b.get(i) == Some(&b'.') {
        let mut j = i + 1;
        let frac = digits(&mut j);
        if n + frac > 0 {
            (i, n) = (j, n + frac);
        }
    }
    if n == 0 {
        return None;
    }
    if matches!(b.get(i), Some(b'e' | b'E')) {
        let mut j = i + 1 + usize::from(matches!(b.get(i + 1), Some(b'+' | b'-')));
        if digits(&mut j) > 0 {
            i = j;
        }
    }
    t[..i].parse().ok()
}

/// JavaScript's `parseInt(s, 10)`: the leading integer of `s`; `None` for its `NaN`.
fn parse_int(s: &str) -> Option<i64> {
    let t = s.trim_start();
    let sign = usize::from(matches!(t.as_bytes().first(), Some(b'+' | b'-')));
    let end = sign + t[sign..].bytes().take_while(u8::is_ascii_digit).count();
    if end == sign {
        return None;
    }
    Some(
        t[..end]
            .parse::<i64>()
            .unwrap_or(if t.starts_with('-') { i64::MIN } else { i64::MAX }),
    )
}

/// What one geolocation asks, read as postcodes.io reads it.
#[derive(Debug, Clone, Copy, PartialEq)]
struct Search {
    lat: f64,
    lon: f64,
    radius: f64,
    limit: i64,
    widesearch: bool,
}

/// A geolocation's options as postcodes.io's `nearestPostcodes` reads them,
/// or its 400 (see the module docs).
fn search_of(o: &serde_json::Map<String, Value>) -> Result<Search, &'static str> {
    let mut limit = 10;
    if truthy(o.get("limit")) {
        limit = parse_int(&js_string(&o["limit"])).ok_or("Invalid result limit submitted")?;
    }
    limit = limit.min(100);
    let coordinate = |k: &str| {
        o.get(k)
            .and_then(|v| parse_float(&js_string(v)))
            .ok_or("Invalid longitude/latitude submitted")
    };
    let (lon, lat) = (coordinate("longitude")?, coordinate("latitude")?);
    let mut radius = 100.0;
    if truthy(o.get("radius")) {
        radius = parse_float(&js_string(&o["radius"])).ok_or("Invalid lookup radius submitted")?;
    }
    let widesearch = truthy(o.get("widesearch")) || truthy(o.get("wideSearch"));
    if widesearch {
        limit = limit.min(WIDESEARCH_COUNT as i64);
    }
    Ok(Search {
        lat,
        lon,
        radius: radius.min(MAX_API_RADIUS_M),
        limit,
        widesearch,
    })
}

/// The answer to one search: `None` for `result: null`; `Err` for
/// PostgreSQL's refusal of a negative limit (500).
fn search(index: &OfflineIndex, q: &Search) -> Result<Option<Vec<Value>>, ()> {
    let limit = usize::try_from(q.limit).map_err(|_| ())?;
    if !(-90.0..=90.0).contains(&q.lat) || !(-180.0..=180.0).contains(&q.lon) {
        return Ok(None);
    }
    let at = LatLon {
        lat: q.lat,
        lon: q.lon,
    };
    let found = if q.widesearch {
        index.widesearch(at, limit)
    } else {
        index.nearest_n(at, q.radius, limit)
    };
    Ok((!found.is_empty()).then(|| found.iter().map(|n| postcode_json(index, n)).collect()))
}

/// A request answered without postcodes: a fault, or postcodes.io's refusal.
type Refused = Box<Response>;

/// The response of a fate that gives no answers, or how to answer.
fn faulty(state: &ServerState, fate: Fate) -> Result<(bool, bool, Option<Duration>), Refused> {
    match fate {
        Fate::Throttle(ra) => {
            count_status(state, 429);
            let mut r = error_body(StatusCode::TOO_MANY_REQUESTS, "Too many requests");
            if let Some(s) = ra {
                r.headers_mut().insert(header::RETRY_AFTER, s.into());
            }
            Err(Box::new(r))
        }
        Fate::Status(code) => {
            count_status(state, code.as_u16());
            Err(Box::new(error_body(code, "injected fault")))
        }
        Fate::Garbage => {
            count_status(state, 200);
            Err(Box::new(
                (StatusCode::OK, "<html><body>502 upstream hiccup</body></html>").into_response(),
            ))
        }
        Fate::Truncated => {
            count_status(state, 200);
            Err(Box::new(
                (
                    StatusCode::OK,
                    [(header::CONTENT_TYPE, "application/json")],
                    "{\"status\":200,\"result\":[{\"query\":{\"lat",
                )
                    .into_response(),
            ))
        }
        Fate::Reset => {
            count_status(state, 0);
            let stream = futures::stream::once(async {
                Err::<bytes::Bytes, std::io::Error>(std::io::Error::other("injected reset"))
            });
            Err(Box::new(
                Response::builder()
                    .status(200)
                    .body(Body::from_stream(stream))
                    .expect("response"),
            ))
        }
        Fate::Answer { fewer, reorder, slow } => Ok((fewer, reorder, slow)),
    }
}

/// The geolocations of a bulk request body, or postcodes.io's 400.
fn geolocations(state: &ServerState, body: &[u8]) -> Result<Vec<Value>, Refused> {
    let bad = |msg: &str| {
        count_status(state, 400);
        Box::new(error_body(StatusCode::BAD_REQUEST, msg))
    };
    let Ok(mut v) = serde_json::from_slice::<Value>(body) else {
        return Err(bad(
            "Invalid JSON submitted. You need to submit a JSON object with an array of geolocation objects",
        ));
    };
    let Some(Value::Array(list)) = v.get_mut("geolocations").map(Value::take) else {
        return Err(bad("Invalid data submitted. You need to provide a JSON array"));
    };
    if list.len() > MAX_BULK_GEOLOCATIONS {
        return Err(bad(
            "Too many locations submitted. Up to 100 locations can be bulk requested at a time",
        ));
    }
    Ok(list)
}

/// One bulk request's answers, as postcodes.io words them.
struct Answered {
    results: Vec<Value>,
    /// (latitude, longitude, radius) bits of each geolocation.
    keys: Vec<(u64, u64, u64)>,
    first_radius: Option<String>,
}

/// Answers each geolocation (the request's query parameters `globals` under
/// its own), or fails the whole request as postcodes.io does (400 for a
/// parameter that is not a number, 500 for a negative limit).
fn answer_all(
    state: &ServerState,
    globals: &serde_json::Map<String, Value>,
    list: &[Value],
) -> Result<Answered, Refused> {
    let mut out = Answered {
        results: Vec::with_capacity(list.len()),
        keys: Vec::with_capacity(list.len()),
        first_radius: None,
    };
    let refuse = |code: StatusCode, msg: &str| {
        count_status(state, code.as_u16());
        Box::new(error_body(code, msg))
    };
    for g in list {
        let mut options = globals.clone();
        if let Value::Object(own) = g {
            options.extend(own.iter().map(|(k, v)| (k.clone(), v.clone())));
        }
        let q = search_of(&options).map_err(|m| refuse(StatusCode::BAD_REQUEST, m))?;
        let result = search(&state.index, &q)
            .map_err(|()| refuse(StatusCode::INTERNAL_SERVER_ERROR, "Internal Server Error"))?;
        let radius = if q.widesearch {
            "widesearch".to_string()
        } else {
            format!("{}", q.radius)
        };
        out.first_radius.get_or_insert(radius);
        let radius_bits = if q.widesearch {
            f64::INFINITY.to_bits()
        } else {
            q.radius.to_bits()
        };
        out.keys
            .push(((q.lat + 0.0).to_bits(), (q.lon + 0.0).to_bits(), radius_bits));
        out.results
            .push(json!({"query": g, "result": result.map_or(Value::Null, Value::Array)}));
    }
    Ok(out)
}

/// Counts a bulk request answered 200: its geolocations, the ones answered before, its radius.
fn count_answered(state: &ServerState, keys: Vec<(u64, u64, u64)>, first_radius: Option<String>) {
    let mut g = state.inner.lock().expect("server state");
    g.stats.geolocations += keys.len() as u64;
    let mut all_repeated = !keys.is_empty();
    for k in keys {
        let n = {
            let n = g.answered.entry(k).or_default();
            *n += 1;
            *n
        };
        if n == 2 {
            g.stats.repeated_queries += 1;
        }
        all_repeated &= n > 1;
    }
    if all_repeated {
        g.stats.repeated_batches += 1;
    }
    *g.stats.by_status.entry(200).or_default() += 1;
    let t = g.started.elapsed().as_secs_f64();
    g.stats.log.push((t, 200));
    if let Some(r) = first_radius {
        *g.stats.answered_by_radius.entry(r).or_default() += 1;
    }
}

/// Query parameters as JSON strings: postcodes.io reads them as the strings they are.
fn strings(q: HashMap<String, String>) -> serde_json::Map<String, Value> {
    q.into_iter().map(|(k, v)| (k, Value::String(v))).collect()
}

async fn bulk(
    State(state): State<ServerState>,
    Query(q): Query<HashMap<String, String>>,
    body: axum::body::Bytes,
) -> Response {
    // postcodes.io: `...(globalLimit && {limit})`, `...(globalWidesearch && {widesearch: true})`
    let mut globals = serde_json::Map::new();
    for key in ["limit", "radius"] {
        if let Some(v) = q.get(key).filter(|v| !v.is_empty()) {
            globals.insert(key.into(), Value::String(v.clone()));
        }
    }
    if q.get("widesearch").is_some_and(|v| !v.is_empty()) {
        globals.insert("widesearch".into(), Value::Bool(true));
    }
    let answered = faulty(&state, decide(&state)).and_then(|how| {
        let list = geolocations(&state, &body)?;
        Ok((how, answer_all(&state, &globals, &list)?))
    });
    let ((fewer, reorder, slow), answered) = match answered {
        Ok(a) => a,
        Err(response) => return *response,
    };
    if let Some(d) = slow {
        tokio::time::sleep(d).await;
    }
    let n = answered.keys.len() as u64;
    if let Some(end) = state.book_work(n) {
        let work = Work {
            state: state.clone(),
            n,
            done: false,
        };
        tokio::time::sleep_until(end.into()).await;
        work.finish();
    }
    let Answered {
        mut results,
        keys,
        first_radius,
    } = answered;
    count_answered(&state, keys, first_radius);
    if fewer {
        results.pop();
    }
    if reorder {
        results.reverse();
    }
    Json(json!({"status": 200, "result": results})).into_response()
}

async fn single(State(state): State<ServerState>, Query(q): Query<HashMap<String, String>>) -> Response {
    let _ = decide(&state);
    let mut o = strings(q);
    // `?latitude=&longitude=` first, then `?lat=&lon=`; both must be non-empty
    let pair = [("latitude", "longitude"), ("lat", "lon")]
        .into_iter()
        .find(|(la, lo)| truthy(o.get(*la)) && truthy(o.get(*lo)));
    let Some((la, lo)) = pair else {
        count_status(&state, 400);
        return error_body(
            StatusCode::BAD_REQUEST,
            "No postcode query submitted. Remember to include query parameter",
        );
    };
    let (lat, lon) = (o[la].clone(), o[lo].clone());
    o.insert("latitude".into(), lat);
    o.insert("longitude".into(), lon);
    // `wideSearch: !!query.wideSearch || !!query.widesearch`
    let wide = truthy(o.get("widesearch")) || truthy(o.get("wideSearch"));
    o.insert("widesearch".into(), Value::Bool(wide));
    let q = match search_of(&o) {
        Ok(q) => q,
        Err(m) => {
            count_status(&state, 400);
            return error_body(StatusCode::BAD_REQUEST, m);
        }
    };
    let Ok(result) = search(&state.index, &q) else {
        count_status(&state, 500);
        return error_body(StatusCode::INTERNAL_SERVER_ERROR, "Internal Server Error");
    };
    count_status(&state, 200);
    Json(json!({"status": 200, "result": result.map_or(Value::Null, Value::Array)})).into_response()
}

async fn get_stats(State(state): State<ServerState>) -> Json<Stats> {
    Json(state.stats())
}

async fn put_faults(State(state): State<ServerState>, Json(f): Json<Faults>) -> StatusCode {
    state.set_faults(f);
    StatusCode::NO_CONTENT
}

/// The server's routes.
pub fn router(state: ServerState) -> Router {
    Router::new()
        .route("/postcodes", post(bulk).get(single))
        .route("/__stats", get(get_stats))
        .route("/__faults", put(put_faults))
        .with_state(state)
}

/// A server running on a loopback port in this process.
pub struct TestServer {
    pub addr: SocketAddr,
    pub state: ServerState,
    task: tokio::task::JoinHandle<()>,
}

impl TestServer {
    /// Starts on 127.0.0.1 with an OS-chosen port.
    pub async fn start(index: Arc<OfflineIndex>, faults: Faults) -> std::io::Result<Self> {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let state = ServerState::new(index, faults, 42);
        let app = router(state.clone());
        let task = tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        Ok(Self { addr, state, task })
    }

    /// Base URL, as given to `--api-url`.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }
}

impl Drop for TestServer {
    fn drop(&mut self) {
        self.task.abort();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn numbers_are_read_as_javascript_reads_them() {
        assert_eq!(parse_float(" 51.5abc"), Some(51.5));
        assert_eq!(parse_float("-.5e2x"), Some(-50.0));
        assert_eq!(parse_float("1e"), Some(1.0));
        assert_eq!(parse_float("abc"), None);
        assert_eq!(parse_float("."), None);
        assert_eq!(parse_int("12.9"), Some(12));
        assert_eq!(parse_int("-3"), Some(-3));
        assert_eq!(parse_int("x1"), None);
        assert!(truthy(Some(&json!("false"))) && !truthy(Some(&json!(0))) && !truthy(Some(&json!(""))));
    }

    fn options(v: Value) -> serde_json::Map<String, Value> {
        v.as_object().unwrap().clone()
    }

    #[test]
    fn parameters_take_postcodes_io_defaults_and_clamps() {
        let at = json!({"latitude": 51.5, "longitude": "-0.1"});
        let with = |extra: Value| {
            let mut o = options(at.clone());
            o.extend(options(extra));
            search_of(&o)
        };
        let base = Search {
            lat: 51.5,
            lon: -0.1,
            radius: 100.0,
            limit: 10,
            widesearch: false,
        };
        assert_eq!(with(json!({})), Ok(base));
        // a numeric 0 is falsy: the default
        assert_eq!(with(json!({"radius": 0, "limit": 0})), Ok(base));
        // a string "0" is not
        assert_eq!(
            with(json!({"radius": "0", "limit": "0"})),
            Ok(Search {
                radius: 0.0,
                limit: 0,
                ..base
            })
        );
        assert_eq!(
            with(json!({"radius": 5000, "limit": 500})),
            Ok(Search {
                radius: 2000.0,
                limit: 100,
                ..base
            })
        );
        assert_eq!(
            with(json!({"widesearch": "false", "limit": 50})),
            Ok(Search {
                widesearch: true,
                limit: 10,
                ..base
            })
        );
        assert_eq!(
            with(json!({"limit": "many"})),
            Err("Invalid result limit submitted")
        );
        assert_eq!(
            with(json!({"radius": "far"})),
            Err("Invalid lookup radius submitted")
        );
        assert_eq!(
            search_of(&options(json!({"latitude": 1}))),
            Err("Invalid longitude/latitude submitted")
        );
    }

    fn tiny() -> Arc<OfflineIndex> {
        // 12 postcodes 0–1.1 km north of (57.1, -2.2), one far away
        let mut text = String::from("pcds,lat,long\n");
        for i in 0..12 {
            text.push_str(&format!("AB1 {i}AA,{},-2.2\n", 57.1 + f64::from(i) * 0.001));
        }
        text.push_str("ZE1 0AA,60.2,-1.1\n");
        Arc::new(
            OfflineIndex::from_reader(Box::new(std::io::Cursor::new(text.into_bytes())), "tiny").unwrap(),
        )
    }

    #[test]
    fn searches_answer_as_postcodes_io_does() {
        let index = tiny();
        let q = |lat: f64, lon: f64, radius: f64, limit: i64, widesearch: bool| {
            search(
                &index,
                &Search {
                    lat,
                    lon,
                    radius,
                    limit,
                    widesearch,
                },
            )
            .map(|r| r.map(|l| l.len()))
        };
        assert_eq!(q(57.1, -2.2, 100.0, 10, false), Ok(Some(1)));
        assert_eq!(
            q(57.1, -2.2, 0.0, 10, false),
            Ok(Some(1)),
            "radius 0: the postcode right there"
        );
        assert_eq!(q(57.1, -2.2, 2000.0, 0, false), Ok(None), "LIMIT 0");
        assert_eq!(
            q(57.1, -2.2, 2000.0, -1, false),
            Err(()),
            "LIMIT -1: PostgreSQL's error"
        );
        assert_eq!(q(95.0, -2.2, 2000.0, 10, false), Ok(None), "out of range: null");
        // widesearch: 10 postcodes within 19.5 km near Aberdeen, not near Lerwick
        assert_eq!(q(57.2, -2.2, 100.0, 10, true), Ok(Some(10)));
        assert_eq!(q(60.2, -1.1, 100.0, 10, true), Ok(None));
    }

    /// Capacity mode: a request whose client gave up is still worked on and
    /// counted as wasted; the next request waits behind it.
    #[tokio::test]
    async fn capacity_mode_queues_requests_and_counts_work_given_up_as_wasted() {
        let faults = Faults {
            capacity: Some(10),
            ..Faults::default()
        };
        let server = TestServer::start(tiny(), faults).await.unwrap();
        let body = json!({"geolocations": vec![json!({"latitude": 57.1, "longitude": -2.2}); 10]});
        let url = format!("{}/postcodes", server.url());
        let impatient = reqwest::Client::builder()
            .timeout(Duration::from_millis(50))
            .build()
            .unwrap();
        assert!(impatient.post(&url).json(&body).send().await.is_err());
        let r = reqwest::Client::new()
            .post(&url)
            .json(&body)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status().as_u16(), 200);
        // The first handler ends when the server notices the closed connection.
        let mut st = server.state.stats();
        for _ in 0..200 {
            if st.wasted_coordinates > 0 {
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
            st = server.state.stats();
        }
        assert_eq!((st.worked_coordinates, st.wasted_coordinates), (20, 10));
        assert!((10..=20).contains(&st.busiest_second_coordinates), "{st:?}");
        assert_eq!(st.max_queued_requests, 2);
    }

    #[tokio::test]
    async fn http_parameters_as_postcodes_io() {
        let server = TestServer::start(tiny(), Faults::default()).await.unwrap();
        let client = reqwest::Client::new();
        let get = |query: &str| {
            let url = format!("{}/postcodes?{query}", server.url());
            let client = client.clone();
            async move {
                let r = client.get(url).send().await.unwrap();
                (r.status().as_u16(), r.json::<Value>().await.unwrap())
            }
        };
        // query strings are strings: "0" is truthy, so radius 0 (the point itself) and LIMIT 0
        let (status, body) = get("lat=57.1&lon=-2.2&radius=0").await;
        assert_eq!(
            (status, body["result"].as_array().map(Vec::len)),
            (200, Some(1)),
            "{body}"
        );
        assert_eq!(
            get("lat=57.1&lon=-2.2&limit=0").await,
            (200, json!({"status": 200, "result": null}))
        );
        assert_eq!(get("lat=95&lon=-2.2").await.1["result"], Value::Null);
        assert_eq!(get("lat=57.1&lon=-2.2&limit=-1").await.0, 500);
        assert_eq!(get("lat=57.1&lon=-2.2&radius=x").await.0, 400);
        let (status, body) = get("latitude=57.2&longitude=-2.2&widesearch=true&limit=3").await;
        assert_eq!((status, body["result"].as_array().map(Vec::len)), (200, Some(3)));
        let bulk = client
            .post(format!("{}/postcodes?limit=2", server.url()))
            .json(&json!({"geolocations": [
                {"latitude": 57.1, "longitude": -2.2, "radius": 2000},
                {"latitude": 57.1, "longitude": -2.2, "radius": 2000, "limit": 4},
                {"latitude": -95, "longitude": -2.2},
                {"latitude": 57.1005, "longitude": -2.2, "radius": 0, "limit": 0}
            ]}))
            .send()
            .await
            .unwrap();
        assert_eq!(bulk.status().as_u16(), 200);
        let body: Value = bulk.json().await.unwrap();
        let lens: Vec<Option<usize>> = body["result"]
            .as_array()
            .unwrap()
            .iter()
            .map(|r| r["result"].as_array().map(Vec::len))
            .collect();
        // the query's limit under each geolocation's own; a numeric 0 overrides it and is falsy:
        // radius 100 m, limit 10, which hold the two postcodes 56 m away
        assert_eq!(lens, [Some(2), Some(4), None, Some(2)]);
    }
}
