-- The GSS codes of a postcode's areas (postcodes.io's `codes`; the offline
-- provider's from the postcode file's area columns), beside their names.
ALTER TABLE lookups ADD COLUMN admin_district_code TEXT;
ALTER TABLE lookups ADD COLUMN admin_county_code TEXT;
ALTER TABLE lookups ADD COLUMN admin_ward_code TEXT;
ALTER TABLE lookups ADD COLUMN parish_code TEXT;
ALTER TABLE lookups ADD COLUMN parliamentary_constituency_code TEXT;
ALTER TABLE lookups ADD COLUMN lsoa_code TEXT;
ALTER TABLE lookups ADD COLUMN msoa_code TEXT;

DROP VIEW point_results;
CREATE VIEW point_results AS
SELECT p.import_id, p.row_number, p.line, p.fields, p.lat, p.lon, p.shard,
       CASE WHEN p.status = 'invalid' THEN 'invalid' ELSE COALESCE(l.status, 'pending') END AS status,
       l.postcode, l.distance_m, l.outcode, l.incode, l.country, l.region, l.admin_district, l.admin_county,
       l.admin_ward, l.parish, l.parliamentary_constituency, l.lsoa, l.msoa,
       l.admin_district_code, l.admin_county_code, l.admin_ward_code, l.parish_code,
       l.parliamentary_constituency_code, l.lsoa_code, l.msoa_code, l.result,
       COALESCE(p.error, l.error) AS error
FROM points p
LEFT JOIN lookups l ON l.import_id = p.import_id AND l.lat = p.lat AND l.lon = p.lon;
