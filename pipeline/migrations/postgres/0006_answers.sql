-- Finished answers kept across imports (issue 13): a later import of the same
-- coordinates, asked of the same provider with the same search parameters,
-- takes its answer from here while it is younger than the maximum age
-- (pipeline::store::answers). Only final answers (enriched, no_match) are kept.
CREATE TABLE answers (
    provider    TEXT NOT NULL,               -- e.g. 'postcodes.io https://api.postcodes.io'
    search      TEXT NOT NULL,               -- e.g. 'radius=100 max_radius=2000 widesearch=true'
    lat         DOUBLE PRECISION NOT NULL,
    lon         DOUBLE PRECISION NOT NULL,
    answered_at DOUBLE PRECISION NOT NULL,   -- seconds since the Unix epoch
    status      TEXT NOT NULL,               -- enriched | no_match
    postcode    TEXT,
    distance_m  DOUBLE PRECISION,
    result      TEXT,
    outcode TEXT, incode TEXT, country TEXT, region TEXT, admin_district TEXT, admin_county TEXT,
    admin_ward TEXT, parish TEXT, parliamentary_constituency TEXT, lsoa TEXT, msoa TEXT,
    admin_district_code TEXT, admin_county_code TEXT, admin_ward_code TEXT, parish_code TEXT,
    parliamentary_constituency_code TEXT, lsoa_code TEXT, msoa_code TEXT,
    PRIMARY KEY (provider, search, lat, lon)
);
