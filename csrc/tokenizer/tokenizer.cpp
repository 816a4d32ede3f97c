// SentencePiece BPE, reproduced from the library's behaviour (sentencepiece 0.2:
// normalizer.cc, bpe_model.cc, model_interface.cc, sentencepiece_processor.cc) and
// checked id for id against it in tests/test_tokenizer.py. Layout: a strict protobuf
// reader of the ModelProto, validation, the encoder (normalize, split, merge by score
// with a heap, resolve), then the decoder (StreamDecoder; decode() is push-all + flush).
#include "tokenizer/tokenizer.h"

#include <algorithm>
#include <atomic>
#include <cstring>
#include <unordered_map>

#include "common/error.h"

namespace oelm {

namespace {

constexpr std::string_view kSpaceSymbol = "\xE2\x96\x81";        // U+2581, escapes ' '
constexpr std::string_view kReplacementChar = "\xEF\xBF\xBD";    // U+FFFD
constexpr std::string_view kDefaultUnkSurface = " \xE2\x81\x87 ";  // " ⁇ " (SentencePiece's default)

std::atomic<uint64_t> next_serial{1};  // Tokenizer::serial_

bool is_trail(unsigned char c) { return (c & 0xC0) == 0x80; }

// Length of the UTF-8 character at p (avail > 0 bytes), or 0 when it is not valid:
// SentencePiece's DecodeUTF8 / IsValidDecodeUTF8 (no overlong forms, no surrogates,
// nothing above U+10FFFF; a truncated sequence is invalid).
size_t utf8_char_len(const char* s, size_t avail) {
  const auto* p = reinterpret_cast<const unsigned char*>(s);
  const unsigned c = p[0];
  if (c < 0x80) return 1;
  if ((c & 0xE0) == 0xC0) {
    if (avail < 2 || !is_trail(p[1])) return 0;
    const unsigned cp = ((c & 0x1F) << 6) | (p[1] & 0x3F);
    return cp >= 0x80 ? 2 : 0;
  }
  if ((c & 0xF0) == 0xE0) {
    if (avail < 3 || !is_trail(p[1]) || !is_trail(p[2])) return 0;
    const unsigned cp = ((c & 0x0F) << 12) | ((p[1] & 0x3F) << 6) | (p[2] & 0x3F);
    return cp >= 0x800 && (cp < 0xD800 || cp >= 0xE000) ? 3 : 0;
  }
  if ((c & 0xF8) == 0xF0) {
    if (avail < 4 || !is_trail(p[1]) || !is_trail(p[2]) || !is_trail(p[3])) return 0;
    const unsigned cp = ((c & 0x07) << 18) | ((p[1] & 0x3F) << 12) | ((p[2] & 0x3F) << 6) | (p[3] & 0x3F);
    return cp >= 0x10000 && cp <= 0x10FFFF ? 4 : 0;
  }
  return 0;
}

// True when the invalid bytes at p could still start a valid character once more bytes
// arrive: a lead byte with fewer bytes than it needs, all of them trail bytes so far.
bool may_complete(const char* s, size_t avail) {
  const auto* p = reinterpret_cast<const unsigned char*>(s);
  const size_t need = (p[0] & 0xE0) == 0xC0 ? 2 : (p[0] & 0xF0) == 0xE0 ? 3 : (p[0] & 0xF8) == 0xF0 ? 4 : 0;
  if (avail >= need) return false;
  for (size_t i = 1; i < avail; ++i)
    if (!is_trail(p[i])) return false;
  return true;
}

bool valid_utf8(std::string_view s) {
  for (size_t i = 0; i < s.size();) {
    const size_t n = utf8_char_len(s.data() + i, s.size() - i);
    if (!n) return false;
    i += n;
  }
  return true;
}

// Length of one character for splitting normalized (valid UTF-8) text: SentencePiece's OneCharLen.
size_t one_char_len(unsigned char c) { return "\1\1\1\1\1\1\1\1\1\1\1\1\2\2\3\4"[c >> 4]; }

bool all_space_symbols(std::string_view s) {
  if (s.empty() || s.size() % 3) return false;
  for (size_t i = 0; i < s.size(); i += 3)
    if (s.substr(i, 3) != kSpaceSymbol) return false;
  return true;
}

// A piece of the form U+2581* followed by no U+2581 (as every piece of a vocabulary trained
// with split_by_whitespace, LLaMA-2's included).
bool space_prefix_form(std::string_view s) {
  size_t i = 0;
  while (s.substr(i, 3) == kSpaceSymbol) i += 3;
  return s.find(kSpaceSymbol, i) == std::string_view::npos;
}

uint64_t hash_bytes(const char* p, size_t n) {
  uint64_t h = 0x9E3779B97F4A7C15ull ^ (uint64_t(n) * 0xFF51AFD7ED558CCDull);
  for (; n >= 8; p += 8, n -= 8) {
    uint64_t v;
    std::memcpy(&v, p, 8);
    h = (h ^ v) * 0xBF58476D1CE4E5B9ull;
    h ^= h >> 29;
  }
  uint64_t v = 0;
  for (size_t i = 0; i < n; ++i) v |= uint64_t(uint8_t(p[i])) << (8 * i);  // no memcpy call for the tail
  h = (h ^ v) * 0x94D049BB133111EBull;
  return h ^ (h >> 31);
}

const char* type_name(int t) {
  switch (t) {
    case 1: return "NORMAL";
    case 2: return "UNKNOWN";
    case 3: return "CONTROL";
    case 4: return "USER_DEFINED";
    case 5: return "UNUSED";
    case 6: return "BYTE";
  }
  return "invalid";
}

// Byte value of a piece "<0x00>".."<0xFF>" (upper-case hex, as SentencePiece writes and
// accepts them), or -1.
int piece_to_byte(std::string_view s) {
  if (s.size() != 6 || s.substr(0, 3) != "<0x" || s[5] != '>') return -1;
  int v = 0;
  for (char c : s.substr(3, 2)) {
    if (c >= '0' && c <= '9') v = v * 16 + (c - '0');
    else if (c >= 'A' && c <= 'F') v = v * 16 + (c - 'A' + 10);
    else return -1;
  }
  return v;
}

std::string quoted(std::string_view s) { return "'" + std::string(s) + "'"; }

// --- a strict protobuf wire-format reader (only what a ModelProto uses) ---------------
class Wire {
 public:
  Wire(std::string_view buf, size_t base, const std::string& origin) : buf_(buf), base_(base), origin_(origin) {}
  bool more() const { return pos_ < buf_.size(); }
  size_t offset() const { return base_ + pos_; }

  // Reads a field key; returns the field number and sets the wire type.
  uint32_t key(uint32_t& wire_type) {
    const uint64_t k = varint();
    wire_type = uint32_t(k & 7);
    if (k >> 3 == 0 || k >> 3 > 0x1FFFFFFF) fail("field number 0 or too large");
    return uint32_t(k >> 3);
  }
  uint64_t varint() {
    uint64_t v = 0;
    for (int shift = 0; shift < 64; shift += 7) {
      if (pos_ >= buf_.size()) fail("truncated varint");
      const uint8_t b = uint8_t(buf_[pos_++]);
      v |= uint64_t(b & 0x7F) << shift;
      if (!(b & 0x80)) return v;
    }
    fail("varint longer than 10 bytes");
  }
  // A length-delimited field; `start` receives its offset in the whole blob.
  std::string_view bytes(size_t* start = nullptr) {
    const uint64_t n = varint();
    if (n > buf_.size() - pos_) fail("length " + std::to_string(n) + " runs past the end");
    if (start) *start = offset();
    std::string_view r = buf_.substr(pos_, size_t(n));
    pos_ += size_t(n);
    return r;
  }
  uint32_t fixed32() {
    if (buf_.size() - pos_ < 4) fail("truncated fixed32");
    uint32_t v;
    std::memcpy(&v, buf_.data() + pos_, 4);  // little-endian hosts only (as the whole reader)
    pos_ += 4;
    return v;
  }
  void skip(uint32_t wire_type) {
    switch (wire_type) {
      case 0: varint(); return;
      case 1:
        if (buf_.size() - pos_ < 8) fail("truncated fixed64");
        pos_ += 8;
        return;
      case 2: bytes(); return;
      case 5: fixed32(); return;
    }
    fail("unsupported wire type " + std::to_string(wire_type));
  }
  // Reads a field of the expected wire type (after key()).
  void expect(uint32_t got, uint32_t want, const char* field) {
    if (got != want) fail(std::string("field ") + field + " has wire type " + std::to_string(got));
  }
  [[noreturn]] void fail(const std::string& what) const {
    throw FormatError(origin_ + ": the tokenizer is not a valid SentencePiece model protobuf (" + what +
                      " at byte " + std::to_string(offset()) +
                      "); re-export with the original tokenizer.model");
  }

 private:
  std::string_view buf_;
  size_t base_;
  size_t pos_ = 0;
  const std::string& origin_;
};

struct RawPiece {
  std::string_view piece;
  float score = 0.0f;
  uint64_t type = 1;  // NORMAL unless stated
};

// The fields of ModelProto that decide how text is tokenized (sentencepiece_model.proto),
// with the proto's defaults.
struct RawModel {
  std::vector<RawPiece> pieces;
  uint64_t model_type = 1;  // UNIGRAM
  bool byte_fallback = false, treat_whitespace_as_suffix = false;
  bool has_unk_surface = false;
  std::string_view unk_surface, bos_piece = "<s>", eos_piece = "</s>";
  std::string_view normalizer_name, charsmap, denormalizer_charsmap;
  bool add_dummy_prefix = true, remove_extra_whitespaces = true, escape_whitespaces = true;
};

RawModel parse_model_proto(std::string_view blob, const std::string& origin) {
  RawModel m;
  Wire top(blob, 0, origin);
  uint32_t wt;
  while (top.more()) {
    const uint32_t f = top.key(wt);
    size_t at = 0;
    if (f == 1) {  // pieces
      top.expect(wt, 2, "pieces");
      Wire w(top.bytes(&at), at, origin);
      RawPiece p;
      while (w.more()) {
        const uint32_t g = w.key(wt);
        if (g == 1) { w.expect(wt, 2, "piece"); p.piece = w.bytes(); }
        else if (g == 2) { w.expect(wt, 5, "score"); const uint32_t u = w.fixed32(); std::memcpy(&p.score, &u, 4); }
        else if (g == 3) { w.expect(wt, 0, "type"); p.type = w.varint(); }
        else w.skip(wt);
      }
      m.pieces.push_back(p);
    } else if (f == 2) {  // trainer_spec
      top.expect(wt, 2, "trainer_spec");
      Wire w(top.bytes(&at), at, origin);
      while (w.more()) {
        const uint32_t g = w.key(wt);
        switch (g) {
          case 3: w.expect(wt, 0, "model_type"); m.model_type = w.varint(); break;
          case 24: w.expect(wt, 0, "treat_whitespace_as_suffix"); m.treat_whitespace_as_suffix = w.varint() != 0; break;
          case 35: w.expect(wt, 0, "byte_fallback"); m.byte_fallback = w.varint() != 0; break;
          case 44: w.expect(wt, 2, "unk_surface"); m.unk_surface = w.bytes(); m.has_unk_surface = true; break;
          case 46: w.expect(wt, 2, "bos_piece"); m.bos_piece = w.bytes(); break;
          case 47: w.expect(wt, 2, "eos_piece"); m.eos_piece = w.bytes(); break;
          default: w.skip(wt);
        }
      }
    } else if (f == 3 || f == 5) {  // normalizer_spec, denormalizer_spec
      top.expect(wt, 2, f == 3 ? "normalizer_spec" : "denormalizer_spec");
      Wire w(top.bytes(&at), at, origin);
      while (w.more()) {
        const uint32_t g = w.key(wt);
        if (f == 5) {
          if (g == 2) { w.expect(wt, 2, "precompiled_charsmap"); m.denormalizer_charsmap = w.bytes(); }
          else w.skip(wt);
          continue;
        }
        switch (g) {
          case 1: w.expect(wt, 2, "name"); m.normalizer_name = w.bytes(); break;
          case 2: w.expect(wt, 2, "precompiled_charsmap"); m.charsmap = w.bytes(); break;
          case 3: w.expect(wt, 0, "add_dummy_prefix"); m.add_dummy_prefix = w.varint() != 0; break;
          case 4: w.expect(wt, 0, "remove_extra_whitespaces"); m.remove_extra_whitespaces = w.varint() != 0; break;
          case 5: w.expect(wt, 0, "escape_whitespaces"); m.escape_whitespaces = w.varint() != 0; break;
          default: w.skip(wt);
        }
      }
    } else {
      top.skip(wt);  // self_test_data and extensions do not change tokenization
    }
  }
  return m;
}

}  // namespace

// --- piece table ------------------------------------------------------------------------
// Open addressing with linear probing, load <= 1/2. 16-bit tags (hash bits, never 0) sit in
// their own array, apart from the ids: most lookups are of pairs that are not pieces, and
// they end at an empty tag after touching only that small, cache-resident array.
struct Tokenizer::Table {
  std::vector<uint16_t> tags;  // 0: empty
  std::vector<int32_t> ids;
  uint64_t mask = 0;

  explicit Table(size_t n) {
    size_t cap = 16;
    while (cap < 2 * n) cap *= 2;
    tags.assign(cap, 0);
    ids.assign(cap, -1);
    mask = cap - 1;
  }
  // Returns the id stored for s, or -1 after inserting `id` (when id >= 0).
  template <typename KeyOf>
  int32_t find_or_insert(std::string_view s, int32_t id, const KeyOf& key_of) {
    const uint64_t h = hash_bytes(s.data(), s.size());
    const uint16_t tag = uint16_t(h >> 48) | 1;
    for (uint64_t i = h & mask;; i = (i + 1) & mask) {
      if (tags[i] == 0) {
        if (id >= 0) {
          tags[i] = tag;
          ids[i] = id;
        }
        return -1;
      }
      if (tags[i] == tag && key_of(ids[i]) == s) return ids[i];
    }
  }
};

Tokenizer::Tokenizer() : serial_(next_serial++) { std::fill(std::begin(byte_ids_), std::end(byte_ids_), -1); }
Tokenizer::~Tokenizer() = default;

int32_t Tokenizer::find(std::string_view s) const {
  return table_->find_or_insert(s, -1, [this](int32_t id) { return str(pieces_[size_t(id)].offset, pieces_[size_t(id)].size); });
}

const TensorView& Tokenizer::stored_tensor(const OelmFile& f) {
  const json::Value* tok = f.metadata().find("tokenizer");
  const json::Value* type = tok ? tok->find("type") : nullptr;
  if (!type || !type->is_string() || type->as_string() != "sentencepiece")
    throw FormatError(f.path() + ": metadata: \"tokenizer\" must be {\"type\": \"sentencepiece\", ...}");
  const json::Value* name = tok->find("tensor");
  if (!name || !name->is_string()) throw FormatError(f.path() + ": metadata: tokenizer has no \"tensor\" name");
  const TensorView* t = f.find(name->as_string());
  if (!t || t->dtype != DType::u8 || t->shape.size() != 1 || t->size == 0)
    throw FormatError(f.path() + ": tokenizer tensor '" + name->as_string() +
                      "' is missing or not a non-empty u8 blob");
  return *t;
}

std::unique_ptr<Tokenizer> Tokenizer::load(const OelmFile& file) {
  const TensorView& t = stored_tensor(file);
  return from_sentencepiece(std::string_view(reinterpret_cast<const char*>(t.data), t.size),
                            file.path() + ": tokenizer '" + t.name + "'");
}

std::unique_ptr<Tokenizer> Tokenizer::from_sentencepiece(std::string_view blob, const std::string& origin) {
  const RawModel m = parse_model_proto(blob, origin);
  auto bad = [&](const std::string& what) -> void {
    throw FormatError(origin + ": " + what);
  };
  const std::string fix = "; openelm_rt implements the SentencePiece BPE tokenizer of LLaMA-2 (which OpenELM uses) "
                          "exactly and nothing else: export with the LLaMA-2 tokenizer.model";
  if (m.model_type != 2)
    bad("model_type is " + std::string(m.model_type == 1 ? "UNIGRAM" : m.model_type == 3 ? "WORD" :
                                       m.model_type == 4 ? "CHAR" : std::to_string(m.model_type)) +
        ", not BPE" + fix);
  if (!m.charsmap.empty() || !(m.normalizer_name.empty() || m.normalizer_name == "identity"))
    bad("normalizer '" + std::string(m.normalizer_name) + "' (with a " + std::to_string(m.charsmap.size()) +
        "-byte character map) is not supported, only 'identity'" + fix);
  if (!m.denormalizer_charsmap.empty()) bad("a denormalizer is not supported" + fix);
  if (m.remove_extra_whitespaces) bad("normalizer option remove_extra_whitespaces=true is not supported" + fix);
  if (!m.escape_whitespaces) bad("normalizer option escape_whitespaces=false is not supported" + fix);
  if (m.treat_whitespace_as_suffix) bad("trainer option treat_whitespace_as_suffix=true is not supported" + fix);
  if (m.pieces.empty()) bad("the vocabulary has no pieces");
  if (m.pieces.size() > (size_t(1) << 24)) bad("the vocabulary has " + std::to_string(m.pieces.size()) + " pieces, more than 2^24");
  if (m.has_unk_surface && !valid_utf8(m.unk_surface)) bad("unk_surface is not valid UTF-8");

  std::unique_ptr<Tokenizer> t(new Tokenizer());
  t->byte_fallback_ = m.byte_fallback;
  t->add_dummy_prefix_ = m.add_dummy_prefix;
  t->unk_surface_ = std::string(m.has_unk_surface ? m.unk_surface : kDefaultUnkSurface);
  t->table_ = std::make_unique<Table>(m.pieces.size());
  size_t total = 0;
  for (const RawPiece& p : m.pieces) total += 2 * p.piece.size();  // pieces and their surfaces
  if (total >= (size_t(1) << 32)) bad("the vocabulary is larger than 4 GiB");
  for (const RawPiece& p : m.pieces) t->text_.append(p.piece);  // the surfaces follow, below

  uint32_t offset = 0;
  for (size_t i = 0; i < m.pieces.size(); ++i) {
    const RawPiece& rp = m.pieces[i];
    const int32_t id = int32_t(i);
    const std::string where = "piece " + std::to_string(i) + " " + quoted(rp.piece);
    if (rp.piece.empty()) bad("piece " + std::to_string(i) + " is empty");
    if (!valid_utf8(rp.piece)) bad("piece " + std::to_string(i) + " is not valid UTF-8");
    if (rp.type < 1 || rp.type > 6) bad(where + " has type " + std::to_string(rp.type) + ", which is not a SentencePiece piece type (1..6)");
    Piece p{offset, uint32_t(rp.piece.size()), 0, 0, rp.score, PieceType(rp.type), -1};
    offset += p.size;
    t->pieces_.push_back(p);
    const int32_t dup = t->table_->find_or_insert(rp.piece, id, [&](int32_t j) { return t->piece(j); });
    if (dup >= 0) bad("duplicate piece " + quoted(rp.piece) + " at ids " + std::to_string(dup) + " and " + std::to_string(i));
    switch (p.type) {
      case PieceType::unknown:
        if (t->unk_id_ >= 0) bad("two UNKNOWN pieces, ids " + std::to_string(t->unk_id_) + " and " + std::to_string(i) + "; there must be exactly one <unk>");
        t->unk_id_ = id;
        break;
      case PieceType::byte: {
        if (!m.byte_fallback) bad(where + " is a BYTE piece but byte_fallback is off");
        const int b = piece_to_byte(rp.piece);
        if (b < 0) bad("bad byte token: " + where + " is a BYTE piece but not of the form <0x00>..<0xFF> (upper-case hex)");
        t->pieces_.back().byte = int16_t(b);
        t->byte_ids_[b] = id;
        break;
      }
      case PieceType::unused: t->has_unused_ = true; [[fallthrough]];
      case PieceType::normal:
      case PieceType::user_defined:
        t->max_piece_size_ = std::max(t->max_piece_size_, p.size);
        if (p.type == PieceType::user_defined) {
          t->user_defined_.emplace_back(rp.piece);
          t->user_defined_first_[uint8_t(rp.piece[0]) >> 3] |= uint8_t(1u << (uint8_t(rp.piece[0]) & 7));
        }
        break;
      case PieceType::control: break;
    }
  }
  if (t->unk_id_ < 0) bad("missing <unk>: no piece has type UNKNOWN");
  if (m.byte_fallback)
    for (int b = 0; b < 256; ++b)
      if (t->byte_ids_[b] < 0) {
        char name[8];
        std::snprintf(name, sizeof name, "<0x%02X>", b);
        bad(std::string("bad byte tokens: byte_fallback is on but the BYTE piece ") + name + " is missing");
      }
  auto special = [&](std::string_view name, const char* what) {
    const int32_t id = t->find(name);
    if (id < 0) bad(std::string("missing ") + what + " piece " + quoted(name));
    if (t->type(id) != PieceType::control)
      bad(std::string(what) + " piece " + quoted(name) + " (id " + std::to_string(id) + ") has type " +
          type_name(int(t->type(id))) + ", expected CONTROL");
    return id;
  };
  t->bos_id_ = special(m.bos_piece, "BOS");
  t->eos_id_ = special(m.eos_piece, "EOS");
  // Words (U+2581* then no U+2581) can be merged one at a time when no piece can span two
  // of them, i.e. every mergeable piece has that form too; not with UNUSED pieces, whose
  // re-splitting depends on the order of candidates over the whole text.
  t->split_words_ = !t->has_unused_;
  for (const Piece& p : t->pieces_)
    if (p.type == PieceType::normal || p.type == PieceType::user_defined)
      t->split_words_ = t->split_words_ && space_prefix_form(t->str(p.offset, p.size));
  std::sort(t->user_defined_.begin(), t->user_defined_.end(),
            [](const std::string& a, const std::string& b) { return a.size() > b.size(); });

  // Decoded surfaces, stored after the pieces: every U+2581 becomes a space.
  std::string surfaces;
  for (Piece& p : t->pieces_) {
    const std::string_view s = t->str(p.offset, p.size);
    p.surface_offset = uint32_t(t->text_.size() + surfaces.size());
    for (size_t i = 0; i < s.size();) {
      if (s.substr(i, 3) == kSpaceSymbol) { surfaces += ' '; i += 3; }
      else surfaces += s[i++];
    }
    p.surface_size = uint32_t(t->text_.size() + surfaces.size() - p.surface_offset);
  }
  t->text_ += surfaces;
  return t;
}

void Tokenizer::check_id(int32_t id) const {
  if (id < 0 || id >= vocab_size())
    throw InvalidArgument("token id " + std::to_string(id) + " is outside the tokenizer's vocabulary [0, " +
                          std::to_string(vocab_size()) + ")");
}

std::string_view Tokenizer::piece(int32_t id) const {
  check_id(id);
  return str(pieces_[size_t(id)].offset, pieces_[size_t(id)].size);
}
PieceType Tokenizer::type(int32_t id) const { check_id(id); return pieces_[size_t(id)].type; }
float Tokenizer::score(int32_t id) const { check_id(id); return pieces_[size_t(id)].score; }

size_t Tokenizer::prefix_match_user_defined(std::string_view s) const {
  const uint8_t c = uint8_t(s[0]);
  if (!(user_defined_first_[c >> 3] & (1u << (c & 7)))) return 0;
  for (const std::string& u : user_defined_)  // longest first
    if (s.size() >= u.size() && s.compare(0, u.size(), u) == 0) return u.size();
  return 0;
}

// --- encoding -----------------------------------------------------------------------------

std::vector<int32_t> Tokenizer::encode(std::string_view text, bool add_bos) const {
  std::vector<int32_t> out;
  encode_into(text, add_bos, out);
  return out;
}

namespace {

struct Symbol {
  uint32_t start, size;  // in the normalized text; size 0 once merged into its left neighbour
  int32_t prev, next;    // neighbours within the word, -1 at its ends
  bool frozen;           // a user-defined symbol: never merged
  bool has_pair;         // (linear merge) this symbol and the next form a piece ...
  float pair_score;      // ... with this score
};

struct Candidate {
  float score;
  int32_t left, right;
  uint32_t size;
};

// Ids of recently encoded words, per thread (natural text repeats its words: a hit
// replaces a whole merge with one lookup). Entries belong to one tokenizer, named by its
// serial number (never reused, unlike an address); the cache is emptied when another
// tokenizer uses the thread, and when it is full.
class WordCache {
 public:
  static constexpr size_t kMaxWordBytes = 48;  // longer words are rare repeats

  const int32_t* find(uint64_t owner, std::string_view word, size_t& n) const {
    if (owner != owner_ || word.size() > kMaxWordBytes) return nullptr;
    const uint64_t h = hash_bytes(word.data(), word.size()) | 1;
    for (size_t i = h & kMask;; i = (i + 1) & kMask) {
      const Entry& e = slots_[i];
      if (e.hash == 0) return nullptr;
      if (e.hash == h && std::string_view(keys_).substr(e.key, e.key_size) == word) {
        n = e.n_ids;
        return ids_.data() + e.ids;
      }
    }
  }
  void insert(uint64_t owner, std::string_view word, const int32_t* ids, size_t n) {
    if (word.size() > kMaxWordBytes) return;
    if (owner != owner_ || used_ >= kSlots / 2) {
      slots_.assign(kSlots, Entry{});
      keys_.clear();
      ids_.clear();
      used_ = 0;
      owner_ = owner;
    }
    const uint64_t h = hash_bytes(word.data(), word.size()) | 1;
    size_t i = h & kMask;
    while (slots_[i].hash != 0) i = (i + 1) & kMask;  // callers insert only after a miss
    slots_[i] = Entry{h, uint32_t(keys_.size()), uint32_t(word.size()), uint32_t(ids_.size()), uint32_t(n)};
    keys_.append(word);
    ids_.insert(ids_.end(), ids, ids + n);
    ++used_;
  }

 private:
  static constexpr size_t kSlots = size_t(1) << 14, kMask = kSlots - 1;
  struct Entry {
    uint64_t hash;  // 0: empty
    uint32_t key, key_size, ids, n_ids;
  };
  uint64_t owner_ = 0;
  std::vector<Entry> slots_;
  std::string keys_;
  std::vector<int32_t> ids_;
  size_t used_ = 0;
};

// Scratch reused by every encode() on a thread: no allocation once it has grown.
struct EncodeScratch {
  std::string norm;
  std::vector<Symbol> sym;
  std::vector<Candidate> heap;
  std::vector<std::string_view> parts;
  WordCache cache;
};


// Words up to this many symbols are merged by scanning for the best pair, longer ones
// with a heap: the same result (highest score, ties leftmost), less overhead when short.
constexpr size_t kLinearMergeMax = 24;

}  // namespace

size_t Tokenizer::encode_into(std::string_view text, bool add_bos, std::vector<int32_t>& out) const {
  const size_t first = out.size();
  if (add_bos) out.push_back(bos_id_);
  if (text.empty()) return out.size() - first;  // SentencePiece: no dummy prefix either

  thread_local EncodeScratch scratch;
  std::string& norm = scratch.norm;
  std::vector<Symbol>& sym = scratch.sym;
  std::vector<Candidate>& heap = scratch.heap;
  norm.clear();

  // 1. Normalize (identity): dummy prefix, ' ' -> U+2581, each byte of invalid UTF-8 ->
  // U+FFFD; user-defined symbols are copied whole.
  const bool has_ud = !user_defined_.empty();
  if (add_dummy_prefix_) norm.append(kSpaceSymbol);
  for (size_t i = 0; i < text.size();) {
    const char c = text[i];
    size_t n = has_ud ? prefix_match_user_defined(text.substr(i)) : 0;
    if (n == 0) {
      if (uint8_t(c) < 0x80) {
        if (c == ' ') norm.append(kSpaceSymbol);
        else norm.push_back(c);
        ++i;
        continue;
      }
      n = utf8_char_len(text.data() + i, text.size() - i);
      if (n == 0) {
        norm.append(kReplacementChar);
        ++i;
        continue;
      }
    }
    for (size_t j = i; j < i + n; ++j) {
      if (text[j] == ' ') norm.append(kSpaceSymbol);
      else norm.push_back(text[j]);
    }
    i += n;
  }
  const std::string_view nv(norm);

  // UNUSED pieces may be formed by merges; they are split again when resolved, into the
  // last pair seen forming them, as SentencePiece does.
  std::unordered_map<int32_t, std::pair<std::string_view, std::string_view>> unused_parts;
  // Whether symbols l and r (adjacent) may merge; sets the merged piece's score.
  auto pair = [&](int32_t l, int32_t r, float& score) {
    const Symbol& a = sym[size_t(l)];
    const Symbol& b = sym[size_t(r)];
    if (a.frozen || b.frozen || a.size + b.size > max_piece_size_) return false;
    const int32_t id = find(nv.substr(a.start, a.size + b.size));
    if (id < 0) return false;
    const Piece& p = pieces_[size_t(id)];
    if (p.type != PieceType::normal && p.type != PieceType::user_defined && p.type != PieceType::unused) return false;
    if (p.type == PieceType::unused) unused_parts[id] = {nv.substr(a.start, a.size), nv.substr(b.start, b.size)};
    score = p.score;
    return true;
  };
  auto merge = [&](int32_t l) {  // symbol l absorbs its right neighbour
    Symbol& a = sym[size_t(l)];
    Symbol& b = sym[size_t(a.next)];
    a.size += b.size;
    b.size = 0;
    a.next = b.next;
    if (a.next >= 0) sym[size_t(a.next)].prev = l;
  };

  // 4. Resolve a symbol to ids: a piece, else unknown: its UTF-8 bytes as <0xXX> pieces
  // with byte fallback, else <unk>, one for a whole run of unknown symbols.
  bool prev_unknown = false;
  auto emit = [&](std::string_view s) {
    int32_t id = find(s);
    if (id < 0) id = unk_id_;
    const bool unknown = pieces_[size_t(id)].type == PieceType::unknown;
    if (unknown && byte_fallback_) {
      for (char b : s) out.push_back(byte_ids_[uint8_t(b)]);
    } else if (!(unknown && prev_unknown)) {
      out.push_back(id);
    }
    prev_unknown = unknown;
  };

  // 3. and 4. for the symbols of one word.
  auto merge_and_emit = [&] {
    // 3. Merge: repeatedly the adjacent pair whose concatenation is a piece with the
    // highest score (ties: leftmost).
    if (sym.size() <= kLinearMergeMax) {
      for (size_t k = 0; k + 1 < sym.size(); ++k) sym[k].has_pair = pair(int32_t(k), int32_t(k + 1), sym[k].pair_score);
      for (;;) {
        int32_t best = -1;
        for (int32_t k = 0; k >= 0; k = sym[size_t(k)].next)
          if (sym[size_t(k)].has_pair && (best < 0 || sym[size_t(k)].pair_score > sym[size_t(best)].pair_score)) best = k;
        if (best < 0) break;
        merge(best);
        Symbol& b = sym[size_t(best)];
        if (b.prev >= 0) sym[size_t(b.prev)].has_pair = pair(b.prev, best, sym[size_t(b.prev)].pair_score);
        b.has_pair = b.next >= 0 && pair(best, b.next, b.pair_score);
      }
    } else {  // as SentencePiece: a heap of candidates; stale ones are recognised by size
      const auto lower = [](const Candidate& a, const Candidate& b) {
        return a.score < b.score || (a.score == b.score && a.left > b.left);
      };
      heap.clear();
      auto consider = [&](int32_t l, int32_t r) {
        float score;
        if (l < 0 || r < 0 || !pair(l, r, score)) return;
        heap.push_back(Candidate{score, l, r, sym[size_t(l)].size + sym[size_t(r)].size});
        std::push_heap(heap.begin(), heap.end(), lower);
      };
      for (size_t k = 1; k < sym.size(); ++k) consider(int32_t(k - 1), int32_t(k));
      while (!heap.empty()) {
        std::pop_heap(heap.begin(), heap.end(), lower);
        const Candidate c = heap.back();
        heap.pop_back();
        const Symbol& l = sym[size_t(c.left)];
        const Symbol& r = sym[size_t(c.right)];
        if (l.size == 0 || r.size == 0 || l.size + r.size != c.size) continue;
        merge(c.left);
        consider(l.prev, c.left);
        consider(c.left, l.next);
      }
    }

    for (int32_t k = 0; k >= 0; k = sym[size_t(k)].next) {
      const std::string_view s = nv.substr(sym[size_t(k)].start, sym[size_t(k)].size);
      if (!has_unused_) {
        emit(s);
        continue;
      }
      std::vector<std::string_view>& parts = scratch.parts;
      parts.assign(1, s);
      while (!parts.empty()) {
        const std::string_view w = parts.back();
        parts.pop_back();
        const int32_t id = find(w);
        const auto it = id >= 0 && pieces_[size_t(id)].type == PieceType::unused ? unused_parts.find(id)
                                                                                 : unused_parts.end();
        if (it == unused_parts.end()) {
          emit(w);
        } else {
          parts.push_back(it->second.second);
          parts.push_back(it->second.first);
        }
      }
    }
  };

  // 2. Split into characters, user-defined symbols first (frozen), and into words where
  // no piece can span the boundary (see split_words_), so that each word is merged alone.
  for (size_t i = 0; i < norm.size();) {
    sym.clear();
    bool content = false;  // the word has a symbol other than U+2581
    while (i < norm.size()) {
      size_t n = has_ud ? prefix_match_user_defined(nv.substr(i)) : 0;
      const bool frozen = n > 0;
      if (!frozen) n = std::min(one_char_len(uint8_t(norm[i])), norm.size() - i);
      const bool space = nv.substr(i, 3) == kSpaceSymbol;
      if (content && space && split_words_) break;
      content = content || !(space && (n == 3 || all_space_symbols(nv.substr(i, n))));
      const int32_t k = int32_t(sym.size());
      sym.push_back(Symbol{uint32_t(i), uint32_t(n), k - 1, k + 1, frozen, false, 0.0f});
      i += n;
    }
    sym.back().next = -1;

    // A word's ids do not depend on the text around it, except that a run of <unk> spans
    // words: a cached word starting with <unk> after one loses that first <unk>.
    const std::string_view word = nv.substr(sym.front().start, i - sym.front().start);
    const bool carried_unknown = prev_unknown && !byte_fallback_;
    const size_t word_first = out.size();
    size_t n_cached = 0;
    const int32_t* cached = split_words_ ? scratch.cache.find(serial_, word, n_cached) : nullptr;
    if (cached) {
      out.insert(out.end(), cached, cached + n_cached);
      prev_unknown = out.back() == unk_id_;
    } else {
      if (split_words_) prev_unknown = false;
      merge_and_emit();
      if (split_words_) scratch.cache.insert(serial_, word, out.data() + word_first, out.size() - word_first);
    }
    if (carried_unknown && split_words_ && out[word_first] == unk_id_) out.erase(out.begin() + long(word_first));
  }
  return out.size() - first;
}

// --- decoding -----------------------------------------------------------------------------

std::string Tokenizer::decode(const int32_t* ids, size_t n) const {
  StreamDecoder d(*this);
  std::string out;
  for (size_t i = 0; i < n; ++i) d.push_into(ids[i], out);
  d.flush_into(out);
  return out;
}

// Emits the held bytes of byte pieces, character by character as SentencePiece's decoder
// does (an invalid byte becomes one U+FFFD); unless `final`, stops before a character
// that more bytes could still complete.
void StreamDecoder::emit_bytes(bool final, std::string& out) {
  size_t i = 0;
  const size_t n = pending_.size();
  while (i < n) {
    const size_t len = utf8_char_len(pending_.data() + i, n - i);
    if (len) {
      out.append(pending_, i, len);
      i += len;
    } else if (!final && may_complete(pending_.data() + i, n - i)) {
      break;
    } else {
      out.append(kReplacementChar);
      ++i;
    }
  }
  if (i) {
    text_seen_ = true;
    pending_.erase(0, i);
  }
}

void StreamDecoder::push_into(int32_t id, std::string& out) {
  const Tokenizer& t = *tok_;
  t.check_id(id);
  const Tokenizer::Piece& p = t.pieces_[size_t(id)];
  if (p.type == PieceType::byte) {
    pending_.push_back(char(p.byte));
    emit_bytes(false, out);
    return;
  }
  emit_bytes(true, out);
  // SentencePiece drops the leading U+2581 (the dummy prefix) of the first text piece only:
  // while no text has been produced and no piece has lost one yet.
  if (bos_ws_seen_ || text_seen_) is_bos_ws_ = false;
  std::string_view s;
  bool stripped = false;
  if (p.type == PieceType::unknown) {
    s = t.unk_surface_;
  } else if (p.type != PieceType::control) {  // control pieces (<s>, </s>) have no text
    s = t.str(p.surface_offset, p.surface_size);
    if (is_bos_ws_ && t.add_dummy_prefix_ && t.str(p.offset, p.size).substr(0, 3) == kSpaceSymbol) {
      s.remove_prefix(1);
      stripped = true;
    }
  }
  bos_ws_seen_ = stripped;
  if (!s.empty()) {
    out.append(s);
    text_seen_ = true;
  }
}

void StreamDecoder::flush_into(std::string& out) { emit_bytes(true, out); }

std::string StreamDecoder::push(int32_t id) {
  std::string out;
  push_into(id, out);
  return out;
}

std::string StreamDecoder::flush() {
  std::string out;
  flush_into(out);
  return out;
}

}  // namespace oelm
