//! Realistic resident health files for the benchmarks: the data set the peer baselines are
//! measured on (`shared/peers/gen.js`), made here record for record, or read from an NDJSON
//! file (`--input`, plain or gzipped) in the same shape.
//!
//! A record is written as an app would write it: the file is created with its demographics,
//! then one operation per contract and per entry (allergy, problem, prescription, encounter,
//! exam): ~11.6 changes per file. Entries are recorded by the writing institution (the model
//! records entries only in their writer's name); the institution a record names for an
//! encounter or an exam is kept in the data set, not in the file.

use std::io::{BufRead, BufReader, Read};
use std::path::Path;

use anyhow::Context;
use estuary_node::model::*;

/// The seed `gen.js` uses by default.
pub const DEFAULT_SEED: u32 = 20_261_123;
/// Longest record line read from an input file, in bytes (records are 1.6-9 KB).
const RECORD_BYTES_MAX: usize = 256 * 1024;

pub use estuary_node::import::ResidentRecords;
pub use estuary_node::import::records::*;

// ---- The generator: `gen.js`, call for call ---------------------------------------------

/// `gen.js`'s generator: sfc32 seeded through splitmix32, in 32-bit arithmetic.
struct Rng {
    state: [u32; 4],
}

impl Rng {
    fn new(seed: u32, stream: u32) -> Self {
        let mut mix = seed ^ stream.wrapping_add(1).wrapping_mul(0x27d4_eb2d);
        let mut splitmix = || {
            mix = mix.wrapping_add(0x9e37_79b9);
            let mut z = mix;
            z = (z ^ (z >> 16)).wrapping_mul(0x85eb_ca6b);
            z = (z ^ (z >> 13)).wrapping_mul(0xc2b2_ae35);
            z ^ (z >> 16)
        };
        let state = [splitmix(), splitmix(), splitmix(), splitmix()];
        let mut rng = Self { state };
        for _ in 0..12 {
            rng.next();
        }
        rng
    }

    fn next(&mut self) -> f64 {
        let [a, b, c, d] = &mut self.state;
        let t = a.wrapping_add(*b).wrapping_add(*d);
        *d = d.wrapping_add(1);
        *a = *b ^ (*b >> 9);
        *b = c.wrapping_add(*c << 3);
        *c = c.rotate_left(21);
        *c = c.wrapping_add(t);
        f64::from(t) / 4_294_967_296.0
    }

    fn int(&mut self, lo: u32, hi: u32) -> u32 {
        lo + (self.next() * f64::from(hi - lo + 1)).floor() as u32
    }

    fn pick<'a, T>(&mut self, items: &'a [T]) -> &'a T {
        &items[(self.next() * items.len() as f64).floor() as usize]
    }

    /// Counts skewed towards the low end: a product of three uniforms.
    fn few(&mut self, lo: u32, hi: u32) -> u32 {
        let span = f64::from(hi - lo + 1);
        lo + (span * self.next() * self.next() * self.next()).floor() as u32
    }

    /// Counts skewed towards the low end: a product of two uniforms.
    fn some(&mut self, lo: u32, hi: u32) -> u32 {
        let span = f64::from(hi - lo + 1);
        lo + (span * self.next() * self.next()).floor() as u32
    }

    fn digits(&mut self, n: usize) -> String {
        (0..n)
            .map(|_| char::from(b'0' + self.int(0, 9) as u8))
            .collect()
    }

    fn date(&mut self, y0: u32, y1: u32) -> String {
        let year = self.int(y0, y1);
        let month = self.int(1, 12);
        let day = self.int(1, 28);
        format!("{year}-{month:02}-{day:02}")
    }

    fn time(&mut self, y0: u32, y1: u32) -> String {
        let date = self.date(y0, y1);
        let hour = self.int(7, 19);
        let minute = self.int(0, 59);
        format!("{date}T{hour:02}:{minute:02}:00+08:00")
    }
}

const FAMILY: [(&str, &str); 18] = [
    ("Zhang", "张"),
    ("Wang", "王"),
    ("Li", "李"),
    ("Zhao", "赵"),
    ("Chen", "陈"),
    ("Yang", "杨"),
    ("Wu", "吴"),
    ("Liu", "刘"),
    ("Huang", "黄"),
    ("Zhou", "周"),
    ("Xu", "徐"),
    ("Zhu", "朱"),
    ("Shi", "施"),
    ("Gu", "顾"),
    ("Shen", "沈"),
    ("Lu", "陆"),
    ("Cai", "蔡"),
    ("Ni", "倪"),
];
const GIVEN: [(&str, &str); 18] = [
    ("Wei", "伟"),
    ("Fang", "芳"),
    ("Min", "敏"),
    ("Jing", "静"),
    ("Qiang", "强"),
    ("Lei", "磊"),
    ("Jun", "军"),
    ("Yan", "艳"),
    ("Yong", "勇"),
    ("Jie", "杰"),
    ("Juan", "娟"),
    ("Tao", "涛"),
    ("Ming", "明"),
    ("Chao", "超"),
    ("Xiuying", "秀英"),
    ("Guilan", "桂兰"),
    ("Jianguo", "建国"),
    ("Haiyan", "海燕"),
];
const TOWNS: [&str; 16] = [
    "Chengqiao",
    "Baozhen",
    "Miaozhen",
    "Chenjia",
    "Xinhe",
    "Zhongxing",
    "Gangyan",
    "Xianghua",
    "Jianshe",
    "Sanxing",
    "Shuxin",
    "Gangxi",
    "Lühua",
    "Hengsha",
    "Changxing",
    "Xinhai",
];
const STREETS: [&str; 7] = [
    "Renmin Rd",
    "Beimen Rd",
    "Huancheng Rd",
    "Xiangyang Rd",
    "Dongmen Rd",
    "Chenhai Hwy",
    "Baoqiao Rd",
];
const DISTRICT_HOSPITALS: [&str; 2] = [
    "Chongming Central Hospital",
    "Chongming No.2 People's Hospital",
];
const MUNICIPAL: &str = "Xinhua Hospital";
const INSURANCE: [&str; 3] = [
    "UEBMI (urban employee)",
    "URRBMI (urban-rural resident)",
    "commercial supplementary",
];
const ALLERGENS: [(&str, &str); 10] = [
    ("penicillin", "urticaria"),
    ("cephalosporins", "rash"),
    ("sulfonamides", "rash"),
    ("aspirin", "bronchospasm"),
    ("iodinated contrast", "angioedema"),
    ("peanut", "anaphylaxis"),
    ("shellfish", "urticaria"),
    ("latex", "contact dermatitis"),
    ("ibuprofen", "gastric pain"),
    ("pollen", "rhinitis"),
];
const PROBLEMS: [(&str, &str); 14] = [
    ("I10", "Essential (primary) hypertension"),
    ("E11.9", "Type 2 diabetes mellitus without complications"),
    ("E78.5", "Hyperlipidaemia, unspecified"),
    ("I25.1", "Atherosclerotic heart disease"),
    (
        "J44.9",
        "Chronic obstructive pulmonary disease, unspecified",
    ),
    ("N18.3", "Chronic kidney disease, stage 3"),
    ("I48.9", "Atrial fibrillation, unspecified"),
    ("M17.9", "Gonarthrosis, unspecified"),
    ("I63.9", "Cerebral infarction, unspecified"),
    ("K21.9", "Gastro-oesophageal reflux disease"),
    ("E03.9", "Hypothyroidism, unspecified"),
    ("F32.9", "Depressive episode, unspecified"),
    ("J45.9", "Asthma, unspecified"),
    ("M81.0", "Postmenopausal osteoporosis"),
];
const DRUGS: [(&str, &str, &str); 12] = [
    ("amlodipine", "5 mg", "once daily"),
    ("metformin", "500 mg", "twice daily"),
    ("atorvastatin", "20 mg", "at night"),
    ("aspirin", "100 mg", "once daily"),
    ("losartan", "50 mg", "once daily"),
    ("metoprolol", "47.5 mg", "once daily"),
    ("insulin glargine", "12 IU", "at night"),
    ("tiotropium", "18 µg", "once daily, inhaled"),
    ("omeprazole", "20 mg", "before breakfast"),
    ("levothyroxine", "50 µg", "before breakfast"),
    ("clopidogrel", "75 mg", "once daily"),
    ("rivaroxaban", "15 mg", "once daily"),
];
const ENCOUNTER_KINDS: [&str; 7] = [
    "outpatient",
    "follow-up",
    "family-doctor visit",
    "emergency",
    "inpatient",
    "referral-in",
    "home visit",
];
const NOTE_PHRASES: [&str; 16] = [
    "Patient reports good adherence to medication.",
    "Blood pressure remains above target; dose adjusted.",
    "No chest pain, dyspnoea or palpitations reported.",
    "Mild ankle oedema on examination.",
    "Fasting glucose improved since last visit.",
    "Advised low-salt diet and daily walking.",
    "Referred up to district hospital for echocardiography.",
    "Returned from municipal hospital after PCI; stable.",
    "Follow-up in four weeks at the community centre.",
    "Lungs clear on auscultation.",
    "Reports dizziness when standing; orthostatic BP measured.",
    "Foot examination normal; monofilament intact.",
    "Smoking cessation counselling given.",
    "Family doctor reviewed exam results with patient and daughter.",
    "Prescription renewed for eight weeks under long-term prescription policy.",
    "Influenza vaccination offered.",
];
const LABS: [(&str, &str, f64, f64, i32); 9] = [
    ("HbA1c", "%", 4.5, 10.5, 1),
    ("fasting glucose", "mmol/L", 4.0, 14.0, 1),
    ("LDL-C", "mmol/L", 1.2, 5.5, 2),
    ("creatinine", "µmol/L", 50.0, 180.0, 0),
    ("eGFR", "mL/min/1.73m2", 25.0, 110.0, 0),
    ("potassium", "mmol/L", 3.2, 5.6, 1),
    ("haemoglobin", "g/L", 95.0, 165.0, 0),
    ("ALT", "U/L", 8.0, 80.0, 0),
    ("TSH", "mIU/L", 0.3, 8.0, 2),
];
const IMAGING: [(&str, &[&str]); 4] = [
    (
        "chest X-ray",
        &[
            "no acute cardiopulmonary findings",
            "mild cardiomegaly",
            "old healed rib fracture",
        ],
    ),
    (
        "abdominal ultrasound",
        &[
            "fatty liver, mild",
            "normal study",
            "gallbladder polyp 4 mm",
        ],
    ),
    (
        "carotid ultrasound",
        &[
            "intima-media thickening",
            "plaque, <50% stenosis",
            "normal study",
        ],
    ),
    (
        "head CT",
        &["old lacunar infarct", "no acute intracranial abnormality"],
    ),
];
const EXAM_KINDS: [&str; 5] = ["lab", "lab", "lab", "imaging", "ecg"];
const RHYTHMS: [&str; 4] = [
    "sinus rhythm",
    "sinus rhythm",
    "atrial fibrillation",
    "sinus bradycardia",
];
const SEVERITIES: [&str; 3] = ["mild", "moderate", "severe"];
const STATUSES: [&str; 3] = ["active", "active", "resolved"];
const DAYS: [u64; 5] = [14, 28, 30, 56, 60];

/// Record `i` of the data set made with `seed`: the record `node gen.js N seed` prints on
/// line `i` (for any N > i).
pub fn record(i: u32, seed: u32) -> FileRecord {
    let r = &mut Rng::new(seed, i);
    let id = format!("hf-{i:08}");
    let (family, family_zh) = *r.pick(&FAMILY);
    let (given, given_zh) = *r.pick(&GIVEN);
    let sex = if r.next() < 0.5 { "female" } else { "male" };
    let birth_date = r.date(1930, 2020);
    let town = *r.pick(&TOWNS);
    let centre = format!("{town} CHC");
    let doctor = RecordDoctor {
        id: format!("doc-{}", r.digits(5)),
        name: format!("{} {}", r.pick(&FAMILY).0, r.pick(&GIVEN).0),
    };
    let institutions = [
        centre.clone(),
        (*r.pick(&DISTRICT_HOSPITALS)).to_string(),
        MUNICIPAL.to_string(),
    ];

    let encounters = (0..r.few(2, 12))
        .map(|_| {
            let len = r.int(100, 400) as usize;
            let mut note = String::new();
            while note.len() < len {
                if !note.is_empty() {
                    note.push(' ');
                }
                let phrase = *r.pick::<&str>(&NOTE_PHRASES);
                note.push_str(phrase);
            }
            note.truncate(len);
            let diagnoses = (0..r.int(1, 3))
                .map(|_| {
                    let (icd10, display) = *r.pick(&PROBLEMS);
                    RecordDiagnosis {
                        icd10: icd10.into(),
                        icd10_system: None,
                        display: display.into(),
                    }
                })
                .collect();
            RecordEncounter {
                id: format!("enc-{}", r.digits(10)),
                institution: r.pick(&institutions).clone(),
                time: r.time(2015, 2026),
                kind: (*r.pick(&ENCOUNTER_KINDS)).into(),
                diagnoses,
                note,
            }
        })
        .collect();

    let exams = (0..r.few(2, 20))
        .map(|_| {
            let kind = *r.pick(&EXAM_KINDS);
            let mut exam = RecordExam {
                id: format!("ex-{}", r.digits(10)),
                kind: kind.into(),
                institution: r.pick(&institutions).clone(),
                time: r.time(2015, 2026),
                name: String::new(),
                value: None,
                unit: None,
                finding: None,
                values: None,
                rhythm: None,
            };
            match kind {
                "lab" => {
                    let (name, unit, lo, hi, places) = *r.pick(&LABS);
                    let scale = 10f64.powi(places);
                    exam.name = name.into();
                    exam.value = Some(((lo + r.next() * (hi - lo)) * scale).round() / scale);
                    exam.unit = Some(unit.into());
                }
                "imaging" => {
                    let (name, findings) = *r.pick(&IMAGING);
                    exam.name = name.into();
                    exam.finding = Some((*r.pick(findings)).into());
                }
                _ => {
                    exam.name = "12-lead ECG".into();
                    exam.values = Some(RecordEcg {
                        heart_rate: u64::from(r.int(48, 120)),
                        pr_ms: u64::from(r.int(120, 220)),
                        qrs_ms: u64::from(r.int(70, 130)),
                        qtc_ms: u64::from(r.int(380, 500)),
                    });
                    exam.rhythm = Some((*r.pick(&RHYTHMS)).into());
                }
            }
            exam
        })
        .collect();

    let demographics = RecordDemographics {
        name: RecordName {
            family: family.into(),
            given: given.into(),
            text: format!("{family_zh}{given_zh}"),
        },
        sex: sex.into(),
        birth_date: birth_date.clone(),
        phone: format!("+86 13{}", r.digits(9)),
        address: RecordAddress {
            line: format!("{} {}", r.int(1, 999), r.pick(&STREETS)),
            town: town.into(),
            district: "Chongming".into(),
            city: "Shanghai".into(),
            postal_code: format!("2021{}", r.digits(2)),
        },
        national_id: format!("310230{}{}", birth_date.replace('-', ""), r.digits(4)),
        insurance: RecordInsurance {
            scheme: (*r.pick(&INSURANCE)).into(),
            number: format!("SH{}", r.digits(12)),
            valid_until: r.date(2026, 2030),
        },
    };
    let family_doctor_contract = RecordContract {
        community_centre: centre,
        district_hospital: (*r.pick(&DISTRICT_HOSPITALS)).into(),
        municipal_hospital: MUNICIPAL.into(),
        doctor: doctor.clone(),
        since: r.date(2016, 2026),
    };
    let allergies = (0..r.few(0, 4))
        .map(|_| {
            let (substance, reaction) = *r.pick(&ALLERGENS);
            RecordAllergy {
                substance: substance.into(),
                reaction: reaction.into(),
                severity: (*r.pick(&SEVERITIES)).into(),
                recorded: r.date(2010, 2026),
            }
        })
        .collect();
    let problems = (0..r.some(0, 6))
        .map(|_| {
            let (icd10, display) = *r.pick(&PROBLEMS);
            RecordProblem {
                icd10: icd10.into(),
                icd10_system: None,
                display: display.into(),
                onset: r.date(1995, 2026),
                status: (*r.pick(&STATUSES)).into(),
            }
        })
        .collect();
    let medications = (0..r.some(0, 5))
        .map(|_| {
            let (drug, dose, frequency) = *r.pick(&DRUGS);
            RecordMedication {
                drug: drug.into(),
                dose: dose.into(),
                frequency: frequency.into(),
                start: r.date(2024, 2026),
                days: *r.pick(&DAYS),
                prescriber: doctor.id.clone(),
            }
        })
        .collect();
    FileRecord {
        id,
        demographics,
        family_doctor_contract,
        allergies,
        problems,
        medications,
        encounters,
        exams,
    }
}

// ---- Reading a data set --------------------------------------------------------------------

/// Where a benchmark's health files come from.
#[derive(Clone, Debug)]
pub enum Source {
    /// Made here, as `gen.js` makes them with this seed.
    Generated { seed: u32 },
    /// Read from an NDJSON file (gzipped if its name ends in `.gz`).
    File(std::path::PathBuf),
}

impl Source {
    /// `--input PATH` when given, else the generated data set.
    pub fn from_input(input: Option<&Path>) -> Self {
        match input {
            Some(path) => Self::File(path.to_owned()),
            None => Self::Generated { seed: DEFAULT_SEED },
        }
    }

    /// The first `count` records (fewer if a file holds fewer).
    pub fn records(&self, count: usize) -> anyhow::Result<Vec<FileRecord>> {
        let mut records = Vec::new();
        self.each_record(count, |record| {
            records.push(record);
            Ok(())
        })?;
        Ok(records)
    }

    /// Hands the first `count` records to `take` one at a time, holding none of them (a
    /// data set of 700,000 files is several GiB as records); returns how many there were
    /// (fewer if a file holds fewer).
    pub fn each_record(
        &self,
        count: usize,
        mut take: impl FnMut(FileRecord) -> anyhow::Result<()>,
    ) -> anyhow::Result<usize> {
        match self {
            Self::Generated { seed } => {
                let count =
                    u32::try_from(count).context("more records than the generator makes")?;
                for i in 0..count {
                    take(record(i, *seed))?;
                }
                Ok(count as usize)
            }
            Self::File(path) => read_ndjson(path, count, take),
        }
    }

    /// What the report says of the data.
    pub fn describe(&self) -> String {
        match self {
            Self::Generated { seed } => format!("gen.js data set, seed {seed}"),
            Self::File(path) => path.display().to_string(),
        }
    }
}

fn read_ndjson(
    path: &Path,
    count: usize,
    mut take: impl FnMut(FileRecord) -> anyhow::Result<()>,
) -> anyhow::Result<usize> {
    let file = std::fs::File::open(path).with_context(|| format!("opening {}", path.display()))?;
    let reader: Box<dyn Read> = if path.extension().is_some_and(|e| e == "gz") {
        Box::new(flate2::read::GzDecoder::new(file))
    } else {
        Box::new(file)
    };
    let mut lines = BufReader::new(reader);
    let mut read_records = 0;
    let mut line = String::new();
    while read_records < count {
        line.clear();
        let read = (&mut lines)
            .take(RECORD_BYTES_MAX as u64 + 1)
            .read_line(&mut line)
            .with_context(|| format!("reading {}", path.display()))?;
        if read == 0 {
            break;
        }
        anyhow::ensure!(
            read <= RECORD_BYTES_MAX,
            "{} line {}: longer than {RECORD_BYTES_MAX} bytes",
            path.display(),
            read_records + 1
        );
        if line.trim().is_empty() {
            continue;
        }
        let record: FileRecord = serde_json::from_str(&line).with_context(|| {
            format!(
                "{} line {}: not a health file record in the data set's shape",
                path.display(),
                read_records + 1
            )
        })?;
        take(record)?;
        read_records += 1;
    }
    Ok(read_records)
}

// ---- Writing a record as an app would -------------------------------------------------------

/// A record as the writes an app makes: the file's creation, then one operation each (every
/// operation with the time the record gives it, when it gives one).
pub struct Writes(pub ResidentRecords);

impl std::ops::Deref for Writes {
    type Target = ResidentRecords;

    fn deref(&self) -> &ResidentRecords {
        &self.0
    }
}

impl Writes {
    /// The file these writes make, written by `actor` as an editor of `institution`, one
    /// change per operation.
    pub fn build(&self, actor: &Actor, institution: &str) -> anyhow::Result<HealthFile> {
        let editor = |at: Timestamp| crate::sample::editor(institution, at.0);
        let mut file = HealthFile::create(actor, &editor(self.created_at), &self.demographics)?;
        for (at, op) in &self.records {
            file.apply(&editor(*at), op)?;
        }
        Ok(file)
    }
}

/// The record as an app writes it.
pub fn writes(record: &FileRecord) -> anyhow::Result<Writes> {
    Ok(Writes(record.resident()?))
}

#[cfg(test)]
mod tests {
    use super::*;
    use sha2::{Digest, Sha256};

    /// `node gen.js 1000` prints, byte for byte, what this generator makes (the same bytes
    /// as `shared/data/health-files-1k.ndjson.gz` holds).
    #[test]
    fn the_generator_makes_the_records_gen_js_makes() {
        let mut lines = String::new();
        for i in 0..1_000 {
            lines.push_str(&serde_json::to_string(&record(i, DEFAULT_SEED)).unwrap());
            lines.push('\n');
        }
        // SHA-256 of `node gen.js 1000` (the data set's first 1,000 records).
        let digest: String = Sha256::digest(lines.as_bytes())
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect();
        assert_eq!(digest, GEN_JS_1000_SHA256);
    }

    const GEN_JS_1000_SHA256: &str =
        "9c2a695422ef1053c347c095fb04ab00a90fb5756a9e11b5c6fd38e221e2bbcb";

    #[test]
    fn every_generated_record_maps_to_operations_the_model_accepts() {
        let editor = Editor {
            institution: InstitutionId::new("jianshe-chc").unwrap(),
            at: Timestamp(0),
        };
        for i in 0..200 {
            let writes = writes(&record(i, DEFAULT_SEED)).unwrap();
            let actor = Actor::from_bytes(vec![7; 32]);
            let mut file = HealthFile::create(&actor, &editor, &writes.demographics).unwrap();
            for (at, op) in &writes.records {
                let editor = Editor {
                    at: *at,
                    ..editor.clone()
                };
                file.apply(&editor, op).unwrap();
            }
            assert_eq!(validate(file.automerge()), Ok(DocumentKind::HealthFile));
            // Loaded in bulk, as one change: the same file, entry for entry.
            let loaded = HealthFile::create_with_records(
                &actor,
                &editor,
                &writes.demographics,
                &writes.records,
            )
            .unwrap();
            assert_eq!(validate(loaded.automerge()), Ok(DocumentKind::HealthFile));
            assert_eq!(
                without_ids(&loaded.view()),
                without_ids(&file.view()),
                "record {i}"
            );
        }
    }

    /// A view as JSON without what differs between two writings of the same content: the
    /// document id and the entry ids (both derived from the changes that wrote them).
    fn without_ids(view: &HealthFileView) -> serde_json::Value {
        fn strip(value: &mut serde_json::Value) {
            match value {
                serde_json::Value::Object(map) => {
                    map.remove("entry");
                    map.remove("id");
                    map.values_mut().for_each(strip);
                }
                serde_json::Value::Array(items) => items.iter_mut().for_each(strip),
                _ => {}
            }
        }
        let mut value = serde_json::to_value(view).unwrap();
        strip(&mut value);
        value
    }

    #[test]
    fn an_input_file_plain_or_gzipped_gives_the_records_it_holds() {
        use std::io::Write;
        let dir = tempfile::tempdir().unwrap();
        let mut lines = String::new();
        for i in 0..3 {
            lines.push_str(&serde_json::to_string(&record(i, DEFAULT_SEED)).unwrap());
            lines.push('\n');
        }
        let plain = dir.path().join("files.ndjson");
        std::fs::write(&plain, &lines).unwrap();
        let gzipped = dir.path().join("files.ndjson.gz");
        let mut encoder = flate2::write::GzEncoder::new(
            std::fs::File::create(&gzipped).unwrap(),
            flate2::Compression::default(),
        );
        encoder.write_all(lines.as_bytes()).unwrap();
        encoder.finish().unwrap();
        let generated = Source::from_input(None).records(3).unwrap();
        for path in [plain, gzipped] {
            let source = Source::from_input(Some(&path));
            assert_eq!(source.records(10).unwrap(), generated);
            assert_eq!(source.records(2).unwrap(), generated[..2]);
        }
        // A line that is not a record is refused, naming its line.
        let bad = dir.path().join("bad.ndjson");
        std::fs::write(&bad, "{\"id\": 1}\n").unwrap();
        let error = Source::from_input(Some(&bad)).records(1).unwrap_err();
        assert!(format!("{error:#}").contains("line 1"), "{error:#}");
    }
}
