"""The script a user would write instead of postcode-operator, for `make bench`.

    python3 bench/reference.py e2e POSTCODES.csv.gz INPUT.csv OUTPUT.csv
        read an ONS postcode file with csv, build scipy's cKDTree, answer the
        nearest postcode (with its distance in metres) for every row of INPUT,
        write OUTPUT. No database.
    python3 bench/reference.py lookups POSTCODES.csv.gz QUERIES.csv
        the same index; prints JSON with parse, build and query times (one
        core: workers=1) and the index memory.

Coordinates become unit vectors on the sphere so Euclidean nearest is
great-circle nearest, the same rule as the Rust index; the distance is the
haversine on the mean Earth radius (6371008.8 m).
"""
import csv, gzip, json, math, resource, sys, time

import numpy as np
from scipy.spatial import cKDTree

R = 6371008.8


def load_postcodes(path):
    opener = gzip.open if path.endswith(".gz") else open
    codes, lats, lons = [], [], []
    with opener(path, "rt", newline="") as f:
        rows = csv.reader(f)
        header = [h.strip().lower() for h in next(rows)]
        pc = header.index("pcds") if "pcds" in header else header.index("pcd")
        la, lo = header.index("lat"), header.index("long")
        for r in rows:
            try:
                lat, lon = float(r[la]), float(r[lo])
            except (ValueError, IndexError):
                continue
            if lat > 90:  # ONS "no grid reference" (99.999999)
                continue
            codes.append(r[pc]); lats.append(lat); lons.append(lon)
    return codes, np.array(lats), np.array(lons)


def unit(lat, lon):
    la, lo = np.radians(lat), np.radians(lon)
    return np.column_stack((np.cos(la) * np.cos(lo), np.cos(la) * np.sin(lo), np.sin(la)))


def haversine(lat1, lon1, lat2, lon2):
    p1, p2 = np.radians(lat1), np.radians(lat2)
    a = np.sin((p2 - p1) / 2) ** 2 + np.cos(p1) * np.cos(p2) * np.sin(np.radians(lon2 - lon1) / 2) ** 2
    return 2 * R * np.arcsin(np.sqrt(a))


def read_queries(path):
    lats, lons, rows = [], [], []
    with open(path, newline="") as f:
        r = csv.reader(f)
        header = next(r)
        for row in r:
            rows.append(row)
            lats.append(float(row[0])); lons.append(float(row[1]))
    return header, rows, np.array(lats), np.array(lons)


def main():
    mode = sys.argv[1]
    t0 = time.perf_counter()
    codes, plat, plon = load_postcodes(sys.argv[2])
    t1 = time.perf_counter()
    tree = cKDTree(unit(plat, plon))
    t2 = time.perf_counter()
    if mode == "lookups":
        _, _, qlat, qlon = read_queries(sys.argv[3])
        q = unit(qlat, qlon)
        t3 = time.perf_counter()
        _, idx = tree.query(q, k=1, workers=1)
        t4 = time.perf_counter()
        print(json.dumps({
            "postcodes": len(codes), "parse_s": t1 - t0, "build_s": t2 - t1,
            "queries": len(q), "query_s": t4 - t3, "queries_per_s": len(q) / (t4 - t3),
            "tree_bytes": int(tree.data.nbytes + tree.indices.nbytes),
            "peak_rss_kib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss,
        }))
        return
    header, rows, qlat, qlon = read_queries(sys.argv[3])
    _, idx = tree.query(unit(qlat, qlon), k=1)
    dist = haversine(qlat, qlon, plat[idx], plon[idx])
    with open(sys.argv[4], "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(header + ["postcode", "distance_m"])
        for row, i, d in zip(rows, idx, dist):
            w.writerow(row + [codes[i], f"{d:.1f}"])


if __name__ == "__main__":
    main()
