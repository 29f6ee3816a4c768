//! jPOS GenericPackager XML files read as dialects.
//!
//! Each `<isofield id=".." length=".." name=".." class=".." [pad=".."]/>` maps
//! to a field by its class, from the classes' documented semantics (prefix:
//! `IFA_` ASCII, `IFB_` BCD numerics with BCD lengths, `IFB_LLH*` binary lengths,
//! `IFE_` EBCDIC; suffix: the value kind). Field 0 (the MTI) and field 1 (the
//! bitmap) set the dialect's MTI and bitmap encodings. An
//! `<isofieldpackager>` whose `packager` is a BER-TLV packager becomes a
//! `tlv = "ber"` field; other subfield packagers are carried as their outer
//! class says, opaque. Any other class is an error naming it, the field and the
//! line. The table is in the README ("jPOS packager files").

use crate::dialect::{
    BitmapEncoding, CodePage, DialectError, DialectFile, Encoding, FieldSpec, FieldType,
    LengthKind, MtiEncoding, PadSide, PrefixEncoding,
};
use crate::tlv::Tlv;

/// Elements read at most (a packager has about 130).
const NODES_MAX: u32 = 10_000;

/// How one class writes a field.
struct Class {
    ty: FieldType,
    length: LengthKind,
    encoding: Encoding,
    prefix: PrefixEncoding,
}

/// The class's mapping, or `None` when it is not one this reader knows.
fn class(name: &str) -> Option<Class> {
    use Encoding as E;
    use FieldType as T;
    use LengthKind as L;
    use PrefixEncoding as P;
    let short = name.rsplit('.').next().unwrap_or(name);
    let c = |ty, length, encoding, prefix| {
        Some(Class {
            ty,
            length,
            encoding,
            prefix,
        })
    };
    match short {
        // ASCII.
        "IFA_NUMERIC" => c(T::N, L::Fixed, E::Ascii, P::Ascii),
        "IFA_LLNUM" => c(T::N, L::LlVar, E::Ascii, P::Ascii),
        "IFA_LLLNUM" => c(T::N, L::LllVar, E::Ascii, P::Ascii),
        "IF_CHAR" | "IFA_CHAR" => c(T::Ans, L::Fixed, E::Ascii, P::Ascii),
        "IFA_LLCHAR" => c(T::Ans, L::LlVar, E::Ascii, P::Ascii),
        "IFA_LLLCHAR" => c(T::Ans, L::LllVar, E::Ascii, P::Ascii),
        "IFA_AMOUNT" => c(T::XN, L::Fixed, E::Ascii, P::Ascii),
        "IFA_BINARY" => c(T::B, L::Fixed, E::Hex, P::Ascii),
        "IFA_LLBINARY" => c(T::B, L::LlVar, E::Hex, P::Ascii),
        "IFA_LLLBINARY" => c(T::B, L::LllVar, E::Hex, P::Ascii),
        // BCD numerics and lengths.
        "IFB_NUMERIC" => c(T::N, L::Fixed, E::Bcd, P::Bcd),
        "IFB_LLNUM" => c(T::N, L::LlVar, E::Bcd, P::Bcd),
        "IFB_LLLNUM" => c(T::N, L::LllVar, E::Bcd, P::Bcd),
        "IFB_LLHNUM" => c(T::N, L::LlVar, E::Bcd, P::Binary),
        "IFB_LLLHNUM" => c(T::N, L::LllVar, E::Bcd, P::Binary),
        "IFB_LLCHAR" => c(T::Ans, L::LlVar, E::Ascii, P::Bcd),
        "IFB_LLLCHAR" => c(T::Ans, L::LllVar, E::Ascii, P::Bcd),
        "IFB_LLHCHAR" => c(T::Ans, L::LlVar, E::Ascii, P::Binary),
        "IFB_LLLHCHAR" => c(T::Ans, L::LllVar, E::Ascii, P::Binary),
        "IFB_LLHECHAR" => c(T::Ans, L::LlVar, E::Ebcdic, P::Binary),
        "IFB_LLLHECHAR" => c(T::Ans, L::LllVar, E::Ebcdic, P::Binary),
        "IFB_BINARY" => c(T::B, L::Fixed, E::Binary, P::Bcd),
        "IFB_LLBINARY" => c(T::B, L::LlVar, E::Binary, P::Bcd),
        "IFB_LLLBINARY" => c(T::B, L::LllVar, E::Binary, P::Bcd),
        "IFB_LLHBINARY" => c(T::B, L::LlVar, E::Binary, P::Binary),
        "IFB_LLLHBINARY" => c(T::B, L::LllVar, E::Binary, P::Binary),
        // EBCDIC.
        "IFE_NUMERIC" => c(T::N, L::Fixed, E::Ebcdic, P::Ebcdic),
        "IFE_LLNUM" => c(T::N, L::LlVar, E::Ebcdic, P::Ebcdic),
        "IFE_LLLNUM" => c(T::N, L::LllVar, E::Ebcdic, P::Ebcdic),
        "IFE_CHAR" => c(T::Ans, L::Fixed, E::Ebcdic, P::Ebcdic),
        "IFE_LLCHAR" => c(T::Ans, L::LlVar, E::Ebcdic, P::Ebcdic),
        "IFE_LLLCHAR" => c(T::Ans, L::LllVar, E::Ebcdic, P::Ebcdic),
        "IFE_AMOUNT" => c(T::XN, L::Fixed, E::Ebcdic, P::Ebcdic),
        "IFE_LLBINARY" => c(T::B, L::LlVar, E::Binary, P::Ebcdic),
        "IFE_LLLBINARY" => c(T::B, L::LllVar, E::Binary, P::Ebcdic),
        _ => None,
    }
}

/// Whether a subfield packager class is a BER-TLV one.
fn is_ber_packager(name: &str) -> bool {
    let short = name.rsplit('.').next().unwrap_or(name);
    short.starts_with("BERTLV") || name.contains(".bertlv.")
}

/// Reads `text`, a GenericPackager XML document, as a dialect file.
pub(crate) fn read(text: &str, origin: &str) -> Result<DialectFile, DialectError> {
    // The DOCTYPE of jPOS files names an external DTD, which is not read.
    let opts = roxmltree::ParsingOptions {
        allow_dtd: true,
        nodes_limit: NODES_MAX,
        ..roxmltree::ParsingOptions::default()
    };
    let fail = |line: u32, problem: String| DialectError::Xml {
        origin: origin.to_owned(),
        line,
        problem,
    };
    let doc = roxmltree::Document::parse_with_options(text, opts)
        .map_err(|e| fail(e.pos().row, e.to_string()))?;
    let root = doc.root_element();
    if root.tag_name().name() != "isopackager" {
        return Err(fail(
            doc.text_pos_at(root.range().start).row,
            format!("expected <isopackager>, found <{}>", root.tag_name().name()),
        ));
    }
    let stem = std::path::Path::new(origin)
        .file_stem()
        .map_or_else(|| origin.to_owned(), |s| s.to_string_lossy().into_owned());
    let mut file = DialectFile {
        name: stem,
        description: format!("jPOS GenericPackager {origin}"),
        mti_encoding: MtiEncoding::Ascii,
        bitmap_encoding: BitmapEncoding::Binary,
        length_prefix_encoding: PrefixEncoding::Ascii,
        // jPOS writes EBCDIC in IBM-1047.
        code_page: None,
        length_counts: None,
        bcd_pad: None,
        bcd_filler: None,
        tertiary_bitmap: None,
        version: None,
        action_codes: None,
        field: Vec::new(),
    };
    let mut ebcdic = false;
    for node in root.children().filter(roxmltree::Node::is_element) {
        let line = doc.text_pos_at(node.range().start).row;
        let tag = node.tag_name().name();
        if tag != "isofield" && tag != "isofieldpackager" {
            return Err(fail(line, format!("unexpected element <{tag}>")));
        }
        let attr = |name: &str| {
            node.attribute(name)
                .ok_or_else(|| fail(line, format!("<{tag}> without {name}=")))
        };
        let id: u8 = attr("id")?
            .parse()
            .ok()
            .filter(|id| *id <= 192)
            .ok_or_else(|| fail(line, "id must be 0..=192".to_owned()))?;
        let length: u16 = attr("length")?
            .parse()
            .map_err(|_| fail(line, format!("field {id}: length is not a number")))?;
        let class_name = attr("class")?;
        let short = class_name.rsplit('.').next().unwrap_or(class_name);
        if id == 1 {
            file.bitmap_encoding = match short {
                "IFB_BITMAP" => BitmapEncoding::Binary,
                "IFA_BITMAP" => BitmapEncoding::Hex,
                "IFE_BITMAP" => {
                    ebcdic = true;
                    BitmapEncoding::HexEbcdic
                }
                _ => {
                    return Err(fail(
                        line,
                        format!("field 1 (bitmap): class {class_name} is not a bitmap class"),
                    ))
                }
            };
            let encoding = if file.bitmap_encoding == BitmapEncoding::Binary {
                Encoding::Binary
            } else {
                Encoding::Hex
            };
            let bitmap = "Bitmap, secondary";
            file.field.push(spec(
                1,
                bitmap,
                FieldType::B,
                LengthKind::Fixed,
                8,
                encoding,
            ));
            // The bitmap's length in bytes: 24 (192 bits) brings a tertiary
            // bitmap, which jPOS reads right after the secondary when bit 65 is set.
            if length > 16 {
                file.tertiary_bitmap = Some(true);
                let tertiary = "Bitmap, tertiary";
                file.field.push(spec(
                    65,
                    tertiary,
                    FieldType::B,
                    LengthKind::Fixed,
                    8,
                    encoding,
                ));
            }
            continue;
        }
        if id == 65 && file.tertiary_bitmap == Some(true) {
            continue; // the tertiary bitmap, defined by field 1's length
        }
        let Some(c) = class(class_name) else {
            return Err(fail(
                line,
                format!(
                    "field {id}: class {class_name} does not map to an encoding switchyard speaks"
                ),
            ));
        };
        ebcdic |= c.encoding == Encoding::Ebcdic || c.prefix == PrefixEncoding::Ebcdic;
        if id == 0 {
            file.mti_encoding = match (c.encoding, c.ty, length) {
                (Encoding::Ascii, FieldType::N, 4) => MtiEncoding::Ascii,
                (Encoding::Bcd, FieldType::N, 4) => MtiEncoding::Bcd,
                (Encoding::Ebcdic, FieldType::N, 4) => MtiEncoding::Ebcdic,
                _ => {
                    return Err(fail(
                        line,
                        format!(
                        "field 0 (MTI): class {short} with length {length} is not a 4-digit MTI"
                    ),
                    ))
                }
            };
            continue;
        }
        let name = node.attribute("name").unwrap_or("");
        // Track data in BCD carries the separator as a nibble: jPOS numeric
        // classes on 35 and 36 are track fields here.
        let ty = if matches!(id, 35 | 36) && c.ty == FieldType::N {
            FieldType::Z
        } else {
            c.ty
        };
        let mut f = spec(id, name, ty, c.length, length, c.encoding);
        if c.length != LengthKind::Fixed {
            f.length_prefix_encoding = Some(c.prefix);
        }
        if c.encoding == Encoding::Bcd {
            // pad="true": left-padded (jPOS's LEFT_PADDED), else right-padded.
            let left = node.attribute("pad").is_some_and(|p| p == "true");
            f.bcd_pad = Some(if left { PadSide::Left } else { PadSide::Right });
        }
        if tag == "isofieldpackager" {
            let packager = node.attribute("packager").unwrap_or("");
            if is_ber_packager(packager) {
                if f.encoding != Encoding::Binary {
                    return Err(fail(
                        line,
                        format!(
                            "field {id}: a BER-TLV packager needs a binary class, found {short}"
                        ),
                    ));
                }
                f.tlv = Some(Tlv::Ber);
            }
        }
        file.field.push(f);
    }
    if ebcdic {
        file.code_page = Some(CodePage::Cp1047);
    }
    Ok(file)
}

fn spec(
    number: u8,
    name: &str,
    ty: FieldType,
    length: LengthKind,
    max: u16,
    encoding: Encoding,
) -> FieldSpec {
    FieldSpec {
        number,
        name: name.to_owned(),
        ty,
        length,
        max,
        encoding,
        length_prefix_encoding: None,
        length_counts: None,
        bcd_pad: None,
        bcd_filler: None,
        tlv: None,
    }
}
