// The native tokenizer: SentencePiece's BPE model as LLaMA-2 (and so OpenELM) uses it,
// reproduced id for id from the ModelProto stored in the .oelm file (docs/FORMAT.md).
// Encoding: identity normalization, spaces escaped as U+2581 with a dummy prefix, code
// points (user-defined symbols first) merged by piece score, byte fallback (<0xXX>) or
// <unk> for what is left. Decoding undoes it, as SentencePiece's DecodeIds does.
// Vocabularies this code does not implement exactly (unigram models, normalizers with a
// character map, ...) are refused at load: it never tokenizes differently in silence.
#pragma once
#include <cstdint>
#include <memory>
#include <string>
#include <string_view>
#include <vector>

#include "format/oelm_file.h"

namespace oelm {

// SentencePiece's piece types (sentencepiece_model.proto, ModelProto.SentencePiece.Type).
enum class PieceType : uint8_t { normal = 1, unknown = 2, control = 3, user_defined = 4, unused = 5, byte = 6 };

class Tokenizer {
 public:
  // Parses and validates the vocabulary stored in the model file (the u8 tensor named by
  // the metadata's "tokenizer" entry); throws FormatError naming the problem.
  static std::unique_ptr<Tokenizer> load(const OelmFile& file);
  // The same from the bytes of a SentencePiece tokenizer.model; `origin` starts every
  // error message (a path, or a description of where the bytes came from).
  static std::unique_ptr<Tokenizer> from_sentencepiece(std::string_view model_proto, const std::string& origin);
  // The tensor holding the tokenizer in `file` (throws FormatError when it is missing).
  static const TensorView& stored_tensor(const OelmFile& file);

  ~Tokenizer();

  // == sentencepiece EncodeAsIds(text), with bos_id() first when add_bos. Bytes that are
  // not valid UTF-8 count as U+FFFD, as in SentencePiece. Thread-safe.
  std::vector<int32_t> encode(std::string_view text, bool add_bos) const;
  // Appends the ids to `out` (no allocation once `out` has grown); returns how many.
  size_t encode_into(std::string_view text, bool add_bos, std::vector<int32_t>& out) const;
  // == sentencepiece DecodeIds; throws InvalidArgument for an id outside [0, vocab_size()).
  std::string decode(const int32_t* ids, size_t n) const;

  std::string_view piece(int32_t id) const;  // the stored piece (with U+2581 for spaces)
  PieceType type(int32_t id) const;
  float score(int32_t id) const;
  int32_t vocab_size() const { return int32_t(pieces_.size()); }
  int32_t bos_id() const { return bos_id_; }
  int32_t eos_id() const { return eos_id_; }
  int32_t unk_id() const { return unk_id_; }
  bool byte_fallback() const { return byte_fallback_; }
  bool add_dummy_prefix() const { return add_dummy_prefix_; }

 private:
  friend class StreamDecoder;
  struct Piece {
    uint32_t offset, size;              // the piece, in text_
    uint32_t surface_offset, surface_size;  // decoded text ("▁" -> " "), in text_
    float score;
    PieceType type;
    int16_t byte;  // 0..255 for BYTE pieces, else -1
  };
  struct Table;  // open-addressing hash table: piece string -> id

  Tokenizer();
  void check_id(int32_t id) const;
  std::string_view str(uint32_t offset, uint32_t size) const { return std::string_view(text_).substr(offset, size); }
  int32_t find(std::string_view s) const;  // -1 when absent
  size_t prefix_match_user_defined(std::string_view s) const;  // 0 when none matches

  std::string text_;  // all pieces, then all decoded surfaces
  std::vector<Piece> pieces_;
  std::unique_ptr<Table> table_;
  std::vector<std::string> user_defined_;  // longest first
  uint8_t user_defined_first_[32] = {};    // bit set of their first bytes
  int32_t byte_ids_[256];
  int32_t bos_id_ = -1, eos_id_ = -1, unk_id_ = -1;
  uint32_t max_piece_size_ = 0;  // in bytes: longer concatenations cannot be pieces
  bool byte_fallback_ = false, add_dummy_prefix_ = true, has_unused_ = false;
  bool split_words_ = false;  // merge word by word: no piece can span two words
  uint64_t serial_;           // names this tokenizer's entries in the per-thread word cache
  std::string unk_surface_;
};

// Incremental detokenizer for streaming. push() returns the text that became final with
// this id -- never a partial UTF-8 character: byte pieces are held until their character
// is complete or known to be invalid -- and the concatenation of every push() and a final
// flush() equals tokenizer.decode(all ids pushed). Leading-space rules are SentencePiece's
// (the dummy-prefix space of the first text piece is dropped). The tokenizer must outlive it.
class StreamDecoder {
 public:
  explicit StreamDecoder(const Tokenizer& tok) : tok_(&tok) {}
  const Tokenizer& tokenizer() const { return *tok_; }
  std::string push(int32_t id);
  // Ends the stream: the held bytes, invalid ones as U+FFFD. Pushing on afterwards
  // continues after the text emitted so far.
  std::string flush();
  // push(), appending to `out` instead of returning.
  void push_into(int32_t id, std::string& out);
  void flush_into(std::string& out);

 private:
  void emit_bytes(bool final, std::string& out);

  const Tokenizer* tok_;
  std::string pending_;      // bytes of byte pieces not emitted yet
  bool text_seen_ = false;   // any text emitted (SentencePiece: !text->empty())
  bool bos_ws_seen_ = false;  // the previous text piece lost its leading U+2581
  bool is_bos_ws_ = true;    // the next text piece may still lose its leading U+2581
};

}  // namespace oelm
