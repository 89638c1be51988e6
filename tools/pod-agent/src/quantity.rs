//! Kubernetes resource quantities ("500m", "128Mi", "1e3") as numbers.

use k8s_openapi::api::core::v1::{Container, Pod};

/// A quantity in base units (cores, bytes); None when it does not parse.
pub fn parse(q: &str) -> Option<f64> {
    let q = q.trim();
    let suffixes: [(&str, f64); 13] = [
        ("Ki", 1024f64),
        ("Mi", 1024f64.powi(2)),
        ("Gi", 1024f64.powi(3)),
        ("Ti", 1024f64.powi(4)),
        ("Pi", 1024f64.powi(5)),
        ("Ei", 1024f64.powi(6)),
        ("n", 1e-9),
        ("u", 1e-6),
        ("m", 1e-3),
        ("k", 1e3),
        ("M", 1e6),
        ("G", 1e9),
        ("T", 1e12),
    ];
    for (s, mult) in suffixes {
        if let Some(n) = q.strip_suffix(s) {
            return n.parse::<f64>().ok().map(|v| v * mult);
        }
    }
    for (s, mult) in [("P", 1e15), ("E", 1e18)] {
        if let Some(n) = q.strip_suffix(s) {
            return n.parse::<f64>().ok().map(|v| v * mult);
        }
    }
    q.parse::<f64>().ok()
}

pub fn cpu_millis(q: &str) -> Option<f64> {
    parse(q).map(|v| v * 1000.0)
}

pub fn bytes(q: &str) -> Option<f64> {
    parse(q)
}

/// The container's `resources.<kind>[name]` in base units.
pub fn resource(c: &Container, kind: &str, name: &str) -> Option<f64> {
    let r = c.resources.as_ref()?;
    let map = match kind {
        "limits" => r.limits.as_ref()?,
        _ => r.requests.as_ref()?,
    };
    parse(&map.get(name)?.0)
}

/// (cpu millicores, memory bytes) a Pod requests: its containers' requests
/// (limits where a request is missing), or the largest init container's.
pub fn pod_requests(p: &Pod) -> (f64, f64) {
    let Some(spec) = p.spec.as_ref() else {
        return (0.0, 0.0);
    };
    let req = |c: &Container, name: &str| {
        resource(c, "requests", name)
            .or_else(|| resource(c, "limits", name))
            .unwrap_or(0.0)
    };
    let mut cpu: f64 = spec.containers.iter().map(|c| req(c, "cpu") * 1000.0).sum();
    let mut mem: f64 = spec.containers.iter().map(|c| req(c, "memory")).sum();
    for c in spec.init_containers.iter().flatten() {
        cpu = cpu.max(req(c, "cpu") * 1000.0);
        mem = mem.max(req(c, "memory"));
    }
    (cpu, mem)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quantities() {
        assert_eq!(parse("500m"), Some(0.5));
        assert_eq!(parse("128Mi"), Some(128.0 * 1024.0 * 1024.0));
        assert_eq!(parse("1G"), Some(1e9));
        assert_eq!(parse("2"), Some(2.0));
        assert_eq!(parse("1e3"), Some(1000.0));
        assert_eq!(cpu_millis("250m"), Some(250.0));
        assert_eq!(parse("x"), None);
    }
}
