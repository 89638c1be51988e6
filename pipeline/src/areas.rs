//! Offline area data: the area codes of an ONS postcode file (NSPL/ONSPD
//! layout) interned into small tables, and their names from the ONS
//! names-and-codes files shipped with it (its `Documents/` folder), filled in
//! as postcodes.io fills them.
//!
//! The mapping is postcodes.io's importer (`seedPostcodes` in its
//! `api/app/models/postcode.ts`, the `data/scripts/*.js` extracting names):
//!
//! | output field | postcode file column (first present) | names file (in `Documents/`) |
//! |---|---|---|
//! | `country` | `ctry` | `Country names and codes …` |
//! | `region` | `rgn` | `Region names and codes …` |
//! | `admin_district` | `laua`, `oslaua` | `LA_UA names and codes …` |
//! | `admin_county` | `cty`, `oscty` | `County names and codes …` |
//! | `admin_ward` | `ward`, `osward` | `… Ward names and codes …` |
//! | `parish` | `parish` | `… Parish … names and codes …` |
//! | `parliamentary_constituency` | `pcon` | `Westminster Parliamentary Constituency names and codes …` |
//! | `lsoa` | `lsoa21`, `lsoa11` | `LSOA (2021) … names and codes …` (`(2011)` for `lsoa11`) |
//! | `msoa` | `msoa21`, `msoa11` | `MSOA (2021) … names and codes …` (`(2011)` for `msoa11`) |
//!
//! Columns named the newer ONS way (`ctry25cd`, `lad25cd`, `wd25cd`, …: the
//! prefix, a two-digit year and `cd`) are read too, the latest year first.
//! A names file's code column is the first whose header ends in `CD`, its name
//! column the first ending in `NM` (else columns 1 and 2); UTF-8, or Latin-1
//! when not valid UTF-8; comma or tab separated. Names are trimmed. As
//! postcodes.io's scripts drop them, pseudo codes (`^\w99999999$`, "no such
//! area here") of counties, regions, constituencies, LSOAs and MSOAs have no
//! name (`None`) but keep their code. postcodes.io answers `lsoa`/`msoa` from
//! the 2021 areas; a file with only `lsoa11`/`msoa11` gives the 2011 ones.
//! postcodes.io adds a few ward and parish names missing from the ONS files
//! by hand (`appendMissing` in its scripts); those stay `None` here.
//!
//! Each postcode keeps one `u32`: the id of its distinct combination of area
//! codes (far fewer combinations than postcodes), each combination nine
//! indices into per-kind tables of distinct codes and names.

use std::{
    collections::HashMap,
    path::{Path, PathBuf},
};

use serde::{Deserialize, Serialize};

use crate::{lookup::Area, slab::Slab};

/// Kinds of area, in this order: country, region, admin_district,
/// admin_county, admin_ward, parish, parliamentary_constituency, lsoa, msoa.
pub const KINDS: usize = 9;

/// One kind of area: its postcode file columns (exact names, then the newer
/// `<prefix><yy>cd` form), whether its names file is this one, whether
/// postcodes.io drops pseudo codes' names.
struct Kind {
    columns: &'static [&'static str],
    prefix: &'static str,
    file: fn(&str) -> bool,
    drop_pseudo: bool,
}

const KIND: [Kind; KINDS] = [
    Kind {
        columns: &["ctry"],
        prefix: "ctry",
        file: |f| f.contains("country names and codes"),
        drop_pseudo: false,
    },
    Kind {
        columns: &["rgn"],
        prefix: "rgn",
        file: |f| f.contains("region names and codes"),
        drop_pseudo: true,
    },
    Kind {
        columns: &["laua", "oslaua"],
        prefix: "lad",
        file: |f| f.contains("la_ua names and codes"),
        drop_pseudo: false,
    },
    Kind {
        columns: &["cty", "oscty"],
        prefix: "cty",
        file: |f| f.contains("county names and codes"),
        drop_pseudo: true,
    },
    Kind {
        columns: &["ward", "osward"],
        prefix: "wd",
        file: |f| f.contains("ward names and codes"),
        drop_pseudo: false,
    },
    Kind {
        columns: &["parish"],
        prefix: "parncp",
        file: |f| f.contains("parish") && f.contains("names and codes"),
        drop_pseudo: false,
    },
    Kind {
        columns: &["pcon"],
        prefix: "pcon",
        file: |f| f.contains("westminster parliamentary constituency names and codes"),
        drop_pseudo: true,
    },
    Kind {
        columns: &["lsoa21", "lsoa11"],
        prefix: "lsoa",
        file: |f| f.starts_with("lsoa") && f.contains("names and codes"),
        drop_pseudo: true,
    },
    Kind {
        columns: &["msoa21", "msoa11"],
        prefix: "msoa",
        file: |f| f.starts_with("msoa") && f.contains("names and codes"),
        drop_pseudo: true,
    },
];

/// postcodes.io's `isPseudoCode` (`/^\w99999999$/`).
fn is_pseudo(code: &str) -> bool {
    code.len() == 9 && code.as_bytes()[0].is_ascii_alphanumeric() && code[1..].bytes().all(|b| b == b'9')
}

/// The column of `kind` in a postcode file's lowercased `headers`, and the
/// two-digit year it names (`lsoa21` → `21`), if any.
fn column_of(kind: &Kind, headers: &[String]) -> Option<(usize, Option<String>)> {
    for c in kind.columns {
        if let Some(i) = headers.iter().position(|h| h == c) {
            return Some((
                i,
                c.get(c.len() - 2..)
                    .filter(|y| y.bytes().all(|b| b.is_ascii_digit()))
                    .map(str::to_string),
            ));
        }
    }
    // Newer ONS headers: <prefix><yy>cd, the latest year first.
    headers
        .iter()
        .enumerate()
        .filter_map(|(i, h)| {
            let year = h.strip_prefix(kind.prefix)?.strip_suffix("cd")?;
            (year.len() == 2 && year.bytes().all(|b| b.is_ascii_digit())).then(|| (i, year.to_string()))
        })
        .max_by(|a, b| a.1.cmp(&b.1))
        .map(|(i, y)| (i, Some(y)))
}

/// The codes and names of an [`AreaTable`]: per kind, the distinct codes
/// (index 0 is "none", the empty code), the name of each (`None` when
/// unnamed), and the two-digit year of the column read (`"21"` for
/// `lsoa21`), if any. Kept in the offline index's cache as JSON.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct AreaStrings {
    codes: Vec<Vec<String>>,
    names: Vec<Vec<Option<String>>>,
    years: Vec<Option<String>>,
}

/// One distinct combination of areas: per kind, an index into
/// [`AreaStrings`]' codes of that kind.
pub type Combo = [u32; KINDS];

/// Area codes and names by id: what [`crate::offline::OfflineIndex`] keeps
/// beside its postcodes. Id 0 is "no area data" (every field `None`).
pub struct AreaTable {
    strings: AreaStrings,
    /// Distinct combinations; index 0 is all "none". Mapped from the cache
    /// when the index is.
    combos: Slab<Combo>,
}

impl Default for AreaTable {
    fn default() -> Self {
        Self::from_parts(
            AreaStrings {
                codes: vec![vec![String::new()]; KINDS],
                names: vec![vec![None]; KINDS],
                years: vec![None; KINDS],
            },
            vec![[0; KINDS]].into(),
        )
    }
}

impl AreaTable {
    /// A table from its parts (a cache's); see [`AreaTable::is_consistent`].
    pub fn from_parts(strings: AreaStrings, combos: Slab<Combo>) -> Self {
        Self { strings, combos }
    }

    /// The strings and the combinations, to cache them.
    pub fn parts(&self) -> (&AreaStrings, &Slab<Combo>) {
        (&self.strings, &self.combos)
    }

    /// Whether there is any area data (the postcode file had area columns
    /// holding codes).
    pub fn is_empty(&self) -> bool {
        self.combos.len() <= 1
    }

    /// Number of distinct area combinations (id 0, "none", included).
    pub fn len(&self) -> usize {
        self.combos.len()
    }

    /// Whether every index of every combination is within its table, and the
    /// tables are whole (a cache's table is checked before use).
    pub fn is_consistent(&self) -> bool {
        let s = &self.strings;
        s.codes.len() == KINDS
            && s.names.len() == KINDS
            && s.years.len() == KINDS
            && s.codes
                .iter()
                .zip(&s.names)
                .all(|(c, n)| c.len() == n.len() && !c.is_empty())
            && self.combos.first() == Some(&[0; KINDS])
            && self.combos.iter().all(|c| {
                c.iter()
                    .zip(&s.codes)
                    .all(|(&i, codes)| (i as usize) < codes.len())
            })
    }

    /// Fills `area`'s names and codes for the combination `id` (0, or an id
    /// out of range: nothing). Codes are filled for the fields postcodes.io
    /// gives codes for (not country and region).
    pub fn fill(&self, id: u32, area: &mut Area) {
        let Some(combo) = self.combos.get(id as usize).filter(|_| id != 0) else {
            return;
        };
        let s = &self.strings;
        let name = |k: usize| s.names[k][combo[k] as usize].clone();
        let code = |k: usize| Some(s.codes[k][combo[k] as usize].clone()).filter(|c| !c.is_empty());
        area.country = name(0);
        area.region = name(1);
        area.admin_district = name(2);
        area.admin_county = name(3);
        area.admin_ward = name(4);
        area.parish = name(5);
        area.parliamentary_constituency = name(6);
        area.lsoa = name(7);
        area.msoa = name(8);
        area.admin_district_code = code(2);
        area.admin_county_code = code(3);
        area.admin_ward_code = code(4);
        area.parish_code = code(5);
        area.parliamentary_constituency_code = code(6);
        area.lsoa_code = code(7);
        area.msoa_code = code(8);
    }

    /// Names the codes from the ONS names-and-codes files in `documents`
    /// (see the module docs); codes no file names stay unnamed. Files that
    /// cannot be read are skipped with a warning.
    pub fn read_names(&mut self, documents: &Path) {
        let files = names_files(documents);
        for (k, kind) in KIND.iter().enumerate() {
            let mut mine: Vec<&PathBuf> = files
                .iter()
                .filter(|(f, _)| (kind.file)(f))
                .map(|(_, p)| p)
                .collect();
            // LSOA/MSOA files of the column's census year, when there are such.
            if let Some(year) = &self.strings.years[k] {
                let tag = format!("(20{year})");
                let of_year: Vec<&PathBuf> = mine
                    .iter()
                    .copied()
                    .filter(|p| lower_name(p).contains(&tag))
                    .collect();
                if !of_year.is_empty() {
                    mine = of_year;
                }
            }
            let index: HashMap<&str, usize> = self.strings.codes[k]
                .iter()
                .enumerate()
                .map(|(i, c)| (c.as_str(), i))
                .collect();
            for path in mine {
                match read_names_file(path) {
                    Ok(pairs) => {
                        for (code, name) in pairs {
                            if let Some(&i) = index.get(code.as_str()) {
                                if i != 0 && !(kind.drop_pseudo && is_pseudo(&code)) && !name.is_empty() {
                                    self.strings.names[k][i] = Some(name);
                                }
                            }
                        }
                    }
                    Err(e) => tracing::warn!(file = %path.display(), "names file skipped: {e}"),
                }
            }
        }
    }
}

fn lower_name(path: &Path) -> String {
    path.file_name()
        .map(|f| f.to_string_lossy().to_lowercase())
        .unwrap_or_default()
}

/// The `.csv` and `.txt` files of `documents` (lowercased file name, path), sorted.
pub fn names_files(documents: &Path) -> Vec<(String, PathBuf)> {
    let mut files: Vec<(String, PathBuf)> = std::fs::read_dir(documents)
        .into_iter()
        .flatten()
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.is_file())
        .map(|p| (lower_name(&p), p))
        .filter(|(f, _)| f.ends_with(".csv") || f.ends_with(".txt"))
        .collect();
    files.sort();
    files
}

/// The `Documents` folder shipped with a postcode file: beside it, or beside
/// its folder (the NSPL zip's `Data/` and `Documents/`).
pub fn documents_dir(postcode_file: &Path) -> Option<PathBuf> {
    let parent = postcode_file.parent()?;
    [Some(parent), parent.parent()]
        .into_iter()
        .flatten()
        .map(|d| d.join("Documents"))
        .find(|d| d.is_dir())
}

/// (code, name) pairs of one names-and-codes file (see the module docs).
fn read_names_file(path: &Path) -> Result<Vec<(String, String)>, String> {
    let bytes = std::fs::read(path).map_err(|e| e.to_string())?;
    let text = match String::from_utf8(bytes) {
        Ok(t) => t,
        Err(e) => e.into_bytes().iter().map(|&b| char::from(b)).collect(),
    };
    let text = text.strip_prefix('\u{feff}').unwrap_or(&text);
    let first = text.lines().next().unwrap_or("");
    let delimiter = if first.contains('\t') && !first.contains(',') {
        b'\t'
    } else {
        b','
    };
    let mut rdr = csv::ReaderBuilder::new()
        .delimiter(delimiter)
        .flexible(true)
        .from_reader(text.as_bytes());
    let headers: Vec<String> = rdr
        .headers()
        .map_err(|e| e.to_string())?
        .iter()
        .map(|h| h.trim().to_ascii_lowercase())
        .collect();
    let code = headers.iter().position(|h| h.ends_with("cd")).unwrap_or(0);
    let name = headers.iter().position(|h| h.ends_with("nm")).unwrap_or(1);
    let mut out = Vec::new();
    for rec in rdr.records() {
        let rec = rec.map_err(|e| e.to_string())?;
        if let (Some(c), Some(n)) = (rec.get(code), rec.get(name)) {
            out.push((c.trim().to_string(), n.trim().to_string()));
        }
    }
    Ok(out)
}

/// Interns the area codes of a postcode file's rows (see [`AreaTable`]).
pub struct AreaBuilder {
    columns: [Option<usize>; KINDS],
    interned: Vec<HashMap<String, u32>>,
    combos: HashMap<Combo, u32>,
    strings: AreaStrings,
    list: Vec<Combo>,
}

impl AreaBuilder {
    /// A builder for a postcode file with these headers (any case).
    pub fn new(headers: &csv::StringRecord) -> Self {
        let lower: Vec<String> = headers.iter().map(|h| h.trim().to_ascii_lowercase()).collect();
        let found: Vec<Option<(usize, Option<String>)>> = KIND.iter().map(|k| column_of(k, &lower)).collect();
        let mut combos = HashMap::new();
        combos.insert([0; KINDS], 0);
        Self {
            columns: std::array::from_fn(|k| found[k].as_ref().map(|f| f.0)),
            interned: (0..KINDS).map(|_| HashMap::from([(String::new(), 0)])).collect(),
            combos,
            strings: AreaStrings {
                codes: vec![vec![String::new()]; KINDS],
                names: vec![vec![None]; KINDS],
                years: found.into_iter().map(|f| f.and_then(|f| f.1)).collect(),
            },
            list: vec![[0; KINDS]],
        }
    }

    /// Whether the file has any area column.
    pub fn has_columns(&self) -> bool {
        self.columns.iter().any(Option::is_some)
    }

    /// The area id of one row (0 when it has no area codes).
    pub fn add(&mut self, rec: &csv::ByteRecord) -> u32 {
        let mut combo = [0u32; KINDS];
        for (k, col) in self.columns.iter().enumerate() {
            let Some(v) = col
                .and_then(|c| rec.get(c))
                .and_then(|v| std::str::from_utf8(v).ok())
            else {
                continue;
            };
            let v = v.trim();
            combo[k] = match self.interned[k].get(v) {
                Some(&i) => i,
                None => {
                    let i = self.strings.codes[k].len() as u32;
                    self.interned[k].insert(v.to_string(), i);
                    self.strings.codes[k].push(v.to_string());
                    self.strings.names[k].push(None);
                    i
                }
            };
        }
        let next = self.list.len() as u32;
        let id = *self.combos.entry(combo).or_insert(next);
        if id == next {
            self.list.push(combo);
        }
        id
    }

    /// The table of the rows added.
    pub fn finish(self) -> AreaTable {
        AreaTable::from_parts(self.strings, self.list.into())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pseudo_codes_and_columns() {
        assert!(is_pseudo("E99999999") && is_pseudo("W99999999"));
        assert!(!is_pseudo("E10000002") && !is_pseudo("E9999999"));
        let h = |s: &str| s.split(',').map(str::to_string).collect::<Vec<_>>();
        assert_eq!(
            column_of(&KIND[7], &h("pcds,lsoa11,lsoa21")),
            Some((2, Some("21".into())))
        );
        assert_eq!(column_of(&KIND[2], &h("pcds,oslaua")), Some((1, None)));
        assert_eq!(
            column_of(&KIND[4], &h("pcds,wd24cd,wd25cd")),
            Some((2, Some("25".into())))
        );
        assert_eq!(column_of(&KIND[0], &h("pcds,lat,long")), None);
    }

    #[test]
    fn names_files_in_latin_1_or_utf_8_with_tabs_or_commas() {
        let dir = std::env::temp_dir().join(format!("pco-names-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let latin1 = dir.join("latin1.txt");
        // "Bôn-y-maen" in Latin-1 (0xF4), tab separated, the name column third.
        let mut bytes = b"WD22CD\tWD22CDO\tWD22NM\nW05001040\t\tB".to_vec();
        bytes.extend([0xF4]);
        bytes.extend(b"n-y-maen \n");
        std::fs::write(&latin1, bytes).unwrap();
        let pairs = read_names_file(&latin1).unwrap();
        assert_eq!(pairs, [("W05001040".to_string(), "B\u{f4}n-y-maen".to_string())]);
        let utf8 = dir.join("utf8.csv");
        std::fs::write(
            &utf8,
            "\u{feff}PCON24CD,PCON24NM,PCON24NMW\nW07000112,Ynys M\u{f4}n,Ynys M\u{f4}n\n",
        )
        .unwrap();
        let pairs = read_names_file(&utf8).unwrap();
        assert_eq!(pairs, [("W07000112".to_string(), "Ynys M\u{f4}n".to_string())]);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn pseudo_codes_keep_their_code_and_lose_their_name_where_postcodes_io_drops_it() {
        let dir = std::env::temp_dir().join(format!("pco-pseudo-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(
            dir.join("County names and codes UK as at 04_23.csv"),
            "CTY23CD,CTY23NM\nE99999999,(pseudo) England\n",
        )
        .unwrap();
        std::fs::write(
            dir.join("LA_UA names and codes UK as at 04_23.csv"),
            "LAD23CD,LAD23NM\nL99999999,Channel Islands\n",
        )
        .unwrap();
        let headers = csv::StringRecord::from(vec!["pcds", "cty", "laua"]);
        let mut b = AreaBuilder::new(&headers);
        let id = b.add(&csv::ByteRecord::from(vec!["GY1 1AA", "E99999999", "L99999999"]));
        let none = b.add(&csv::ByteRecord::from(vec!["ZZ1 1ZZ", "", ""]));
        let mut table = b.finish();
        table.read_names(&dir);
        assert!(table.is_consistent() && table.len() == 2 && none == 0);
        let mut area = Area::default();
        table.fill(id, &mut area);
        assert_eq!(
            (area.admin_county, area.admin_county_code.as_deref()),
            (None, Some("E99999999"))
        );
        assert_eq!(area.admin_district.as_deref(), Some("Channel Islands"));
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
