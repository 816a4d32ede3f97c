// pybind11 bindings: a thin layer over the C++ core. Heavy calls release the GIL and
// poll for Ctrl-C between layers, so a long prefill stops promptly and cleanly.
// The Python-facing API (Session, generate, CLI) lives in python/openelm_rt/.
#include <unistd.h>

#include <atomic>
#include <cstdlib>
#include <cstring>
#include <tuple>

#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include "common/bandwidth.h"
#include "common/error.h"
#include "engine/engine.h"
#include "engine/runtime.h"
#include "generate/sampler.h"
#include "generate/text_stream.h"
#include "kernels/dispatch.h"
#include "model/model.h"
#include "model/streaming.h"
#include "model/cuda.h"
#include "tokenizer/tokenizer.h"

namespace py = pybind11;
using namespace oelm;

namespace {

py::object to_python(const json::Value& v) {
  switch (v.kind()) {
    case json::Value::Kind::null: return py::none();
    case json::Value::Kind::boolean: return py::bool_(v.as_bool());
    case json::Value::Kind::number:
      return v.is_integer() ? py::object(py::int_(v.as_int())) : py::object(py::float_(v.as_double()));
    case json::Value::Kind::string: return py::str(v.as_string());
    case json::Value::Kind::array: {
      py::list l;
      for (const auto& e : v.items()) l.append(to_python(e));
      return l;
    }
    case json::Value::Kind::object: {
      py::dict d;
      for (const auto& kv : v.members()) d[py::str(kv.first)] = to_python(kv.second);
      return d;
    }
  }
  return py::none();
}

// Polls Python's signal handlers from the computing (main) thread; a pending
// KeyboardInterrupt leaves the Python error set and aborts the evaluation.
bool python_interrupt() {
  py::gil_scoped_acquire gil;
  return PyErr_CheckSignals() != 0;
}

// Runs fn without the GIL; turns an interruption into the pending Python exception.
template <typename Fn>
void run_released(Fn&& fn) {
  bool interrupted = false;
  {
    py::gil_scoped_release release;
    try {
      fn();
    } catch (const Interrupted&) {
      interrupted = true;
    }
  }
  if (interrupted) {
    if (PyErr_Occurred()) throw py::error_already_set();
    throw py::value_error("interrupted");
  }
}

std::vector<int32_t> to_ids(const std::vector<int64_t>& ids, int64_t vocab) {
  std::vector<int32_t> out;
  out.reserve(ids.size());
  for (size_t i = 0; i < ids.size(); ++i) {
    if (ids[i] < 0 || ids[i] >= vocab)
      throw InvalidArgument("token id " + std::to_string(ids[i]) + " at index " + std::to_string(i) +
                            " is outside the vocabulary [0, " + std::to_string(vocab) + ")");
    out.push_back(int32_t(ids[i]));
  }
  return out;
}

py::array tensor_copy(const TensorView& t) {
  std::vector<py::ssize_t> shape(t.shape.begin(), t.shape.end());
  if (dtype_is_quantized(t.dtype)) shape = {py::ssize_t(t.size)};  // not one element per weight
  py::dtype dt;
  switch (t.dtype) {
    case DType::f32: dt = py::dtype::of<float>(); break;
    case DType::f16: dt = py::dtype("float16"); break;
    case DType::bf16: dt = py::dtype::of<uint16_t>(); break;
    case DType::i32: dt = py::dtype::of<int32_t>(); break;
    case DType::u8:
    case DType::q8:
    case DType::q4:
    case DType::q6:
    case DType::q5:
    case DType::q4k: dt = py::dtype::of<uint8_t>(); break;  // block types: the raw bytes
  }
  py::array a(dt, shape);
  std::memcpy(a.mutable_data(), t.data, t.size);
  return a;
}

// A weight matrix handed in from Python (for the kernel tests): a TensorView over the
// buffer of a uint8 array, checked to be exactly tensor_bytes(dtype, [N, K]) long.
TensorView weight_view(const py::array_t<uint8_t, py::array::c_style>& w, const std::string& dtype, int64_t N,
                       int64_t K) {
  TensorView v;
  v.name = "(test matrix)";
  if (!dtype_from_name(dtype, &v.dtype) || !dtype_is_weight(v.dtype))
    throw InvalidArgument("unknown weight dtype '" + dtype + "'");
  v.shape = {N, K};
  uint64_t want = 0;
  if (N < 1 || K < 1 || !tensor_bytes(v.dtype, v.shape, &want) || uint64_t(w.size()) != want)
    throw InvalidArgument("a " + dtype + " [" + std::to_string(N) + ", " + std::to_string(K) + "] matrix is " +
                          std::to_string(want) + " bytes, got " + std::to_string(w.size()));
  v.data = w.data();
  v.size = want;
  return v;
}

// The engine with the runtime it steps (kept alive together).
struct PyEngine {
  std::shared_ptr<Runtime> rt;
  std::unique_ptr<Engine> eng;
};

py::dict event_dict(Event& e) {
  py::dict d;
  d["id"] = e.id;
  d["token"] = e.token;
  d["text"] = py::str(e.text);  // complete UTF-8 characters (TextStream)
  d["finish"] = finish_reason_name(e.finish);
  d["t"] = e.t_emit;  // emit time, on the clock of time.perf_counter() (steady_clock)
  if (e.finish != FinishReason::none) {
    d["error"] = e.error;
    d["error_kind"] = error_kind_name(e.error_kind);
    d["n_prompt"] = e.n_prompt;
    d["n_cached"] = e.n_cached;
    d["n_generated"] = e.n_generated;
    d["n_decoded"] = e.n_decoded;
    d["prefill_seconds"] = e.prefill_seconds;
    d["decode_seconds"] = e.decode_seconds;
  }
  if (e.token >= 0 && (!e.top.empty() || e.logprob != 0.0f)) {
    d["logprob"] = e.logprob;
    py::list top;
    for (const TokenLogprob& t : e.top) top.append(py::make_tuple(t.token, t.logprob));
    d["top"] = top;
  }
  if (!e.prompt_logprobs.empty())
    d["prompt_logprobs"] = py::array_t<float>(py::ssize_t(e.prompt_logprobs.size()), e.prompt_logprobs.data());
  if (!e.prompt_top.empty()) {
    py::list tops;
    for (const auto& row : e.prompt_top) {
      py::list top;
      for (const TokenLogprob& t : row) top.append(py::make_tuple(t.token, t.logprob));
      tops.append(top);
    }
    d["prompt_top"] = tops;
  }
  return d;
}

py::list event_list(std::vector<Event>& events) {
  py::list out;
  for (Event& e : events) out.append(event_dict(e));
  return out;
}

std::vector<int32_t> ids_arg(const py::handle& h, int64_t vocab, const char* what) {
  const std::vector<int64_t> v = h.cast<std::vector<int64_t>>();
  std::vector<int32_t> out;
  out.reserve(v.size());
  for (size_t i = 0; i < v.size(); ++i) {
    if (v[i] < 0 || v[i] >= vocab)
      throw InvalidArgument(std::string(what) + "[" + std::to_string(i) + "] = " + std::to_string(v[i]) +
                            " is outside the vocabulary [0, " + std::to_string(vocab) + ")");
    out.push_back(int32_t(v[i]));
  }
  return out;
}

}  // namespace

PYBIND11_MODULE(_core, m) {
  m.doc() = "openelm_rt native core (private; use openelm_rt.Session)";

  py::register_exception<FormatError>(m, "FormatError", PyExc_ValueError);
  py::register_exception_translator([](std::exception_ptr p) {
    try {
      if (p) std::rethrow_exception(p);
    } catch (const FileNotFound& e) {
      PyErr_SetString(PyExc_FileNotFoundError, e.what());
    } catch (const InvalidArgument& e) {
      PyErr_SetString(PyExc_ValueError, e.what());
    }
  });

  // Registered after the translator above, so it is tried first (a KvBudgetExceeded is an
  // InvalidArgument too): Python sees openelm_rt.KVBudgetError, a ValueError.
  py::register_exception<KvBudgetExceeded>(m, "KVBudgetError", PyExc_ValueError);

  py::class_<Model, std::shared_ptr<Model>>(m, "Model")
      .def(py::init([](const std::string& path, bool verify) {
             std::shared_ptr<Model> model;
             {
               py::gil_scoped_release release;
               model = Model::load(path, verify);
             }
             return model;
           }),
           py::arg("path"), py::arg("verify") = false)
      .def_property_readonly("config", [](const Model& mdl) { return to_python(*mdl.file().metadata().find("model")); })
      .def_property_readonly("metadata", [](const Model& mdl) { return to_python(mdl.file().metadata()); })
      .def_property_readonly("weights_dtype", [](const Model& mdl) { return dtype_name(mdl.config().weights_dtype); })
      .def_property_readonly("embedding_dtype", [](const Model& mdl) { return dtype_name(mdl.config().embedding_dtype); })
      .def_property_readonly("vocab_size", [](const Model& mdl) { return mdl.config().vocab_size; })
      .def_property_readonly("format_version", [](const Model& mdl) { return mdl.file().format_version(); })
      .def_property_readonly("names_version", [](const Model& mdl) { return mdl.file().names_version(); })
      .def_property_readonly("file_size", [](const Model& mdl) { return mdl.file().file_size(); })
      .def("tokenizer_blob", [](const Model& mdl) { auto b = mdl.tokenizer_blob(); return py::bytes(b.data(), b.size()); })
      .def_property_readonly("tokenizer", &Model::tokenizer, py::return_value_policy::reference_internal)
      .def_property_readonly("has_tokenizer", &Model::has_tokenizer)
      .def("tensor_names", [](const Model& mdl) {
        std::vector<std::string> n;
        for (const auto& t : mdl.file().tensors()) n.push_back(t.name);
        return n;
      })
      .def("tensor", [](const Model& mdl, const std::string& name) {
        const TensorView* t = mdl.file().find(name);
        if (!t) throw InvalidArgument("no tensor named '" + name + "' in the file");
        return tensor_copy(*t);
      }, py::arg("name"))
      .def("verify_checksums", [](const Model& mdl) {
        py::gil_scoped_release release;
        mdl.file().verify_checksums();
      });

  py::class_<Tokenizer>(m, "Tokenizer")
      .def_static("from_sentencepiece", [](std::string_view model_proto) {
        return Tokenizer::from_sentencepiece(model_proto, "tokenizer.model bytes");
      }, py::arg("model_proto"), "A tokenizer from the bytes of a SentencePiece tokenizer.model (for tests and benchmarks).")
      .def("encode", &Tokenizer::encode, py::arg("text"), py::arg("add_bos") = false,
           "== sentencepiece EncodeAsIds, with BOS first when add_bos.")
      .def("encode_batch", [](const Tokenizer& t, const std::vector<std::string>& texts, bool add_bos) {
        std::vector<std::vector<int32_t>> out(texts.size());
        {
          py::gil_scoped_release release;
          for (size_t i = 0; i < texts.size(); ++i) t.encode_into(texts[i], add_bos, out[i]);
        }
        return out;
      }, py::arg("texts"), py::arg("add_bos") = false, "encode() of each text, on one thread, without the GIL.")
      .def("decode", [](const Tokenizer& t, const std::vector<int64_t>& ids) {
        const std::vector<int32_t> tok = to_ids(ids, t.vocab_size());
        return t.decode(tok.data(), tok.size());
      }, py::arg("ids"), "== sentencepiece DecodeIds.")
      .def("piece", [](const Tokenizer& t, int64_t id) { return std::string(t.piece(to_ids({id}, t.vocab_size())[0])); },
           py::arg("id"))
      .def("score", [](const Tokenizer& t, int64_t id) { return t.score(to_ids({id}, t.vocab_size())[0]); }, py::arg("id"))
      .def_property_readonly("vocab_size", &Tokenizer::vocab_size)
      .def_property_readonly("bos_id", &Tokenizer::bos_id)
      .def_property_readonly("eos_id", &Tokenizer::eos_id)
      .def_property_readonly("unk_id", &Tokenizer::unk_id)
      .def_property_readonly("byte_fallback", &Tokenizer::byte_fallback);

  py::class_<StreamDecoder>(m, "StreamDecoder")
      .def(py::init<const Tokenizer&>(), py::arg("tokenizer"), py::keep_alive<1, 2>())
      .def("push", [](StreamDecoder& d, int64_t id) { return d.push(to_ids({id}, d.tokenizer().vocab_size())[0]); },
           py::arg("id"), "The text completed by this id (never a partial UTF-8 character).")
      .def("flush", &StreamDecoder::flush, "The held bytes at the end of the stream.");

  m.def("cuda_info", [] {
    std::string why;
    const bool ok = cuda_available(&why);
    py::dict d;
    d["compiled"] = cuda_compiled();
    d["available"] = ok;
    d["reason"] = ok ? std::string() : why;
    d["device"] = ok ? cuda_device_description() : std::string();
    return d;
  }, "The CUDA backend: compiled (in this build), available (a usable device), reason (why not), device.");

  py::class_<Backend, std::shared_ptr<Backend>>(m, "Backend")
      .def(py::init([](const std::string& name, int threads, const std::string& kernels, bool exact) {
             auto b = Backend::create(name, threads, kernels);
             b->set_exact(exact);
             return b;
           }),
           py::arg("name") = "cpu", py::arg("threads") = 0, py::arg("kernels") = "", py::arg("exact") = true,
           "exact (default True): bf16 weights times exact f32 activations; False: times activations rounded\n"
           "to bf16 where the kernels have bf16 dot products (AVX-512 BF16). docs/WEIGHT_TYPES.md.")
      .def_property_readonly("exact", &Backend::exact)
      .def("rounds_activations", [](const Backend& b, const std::string& dtype) {
        DType t;
        if (!dtype_from_name(dtype, &t)) throw InvalidArgument("unknown dtype '" + dtype + "'");
        return b.rounds_activations(t);
      }, py::arg("dtype"), "Whether matmuls with these weights round activations to bf16 (bf16 dot products).")
      .def_property_readonly("name", &Backend::name)
      .def_property_readonly("threads", &Backend::threads)
      .def_property_readonly("kernels", [](const Backend& b) { return std::string(b.kernels().name); })
      .def_static("names", &Backend::names)
      .def_static("kernel_variants", &supported_kernel_variants,
                  "Kernel variants this build has and this CPU can run, fastest first")
      .def("kernel_matmul", [](Backend& b, py::array_t<uint8_t, py::array::c_style> w, const std::string& dtype,
                               int64_t N, int64_t K, py::array_t<float, py::array::c_style | py::array::forcecast> x) {
        const TensorView W = weight_view(w, dtype, N, K);
        if (x.ndim() != 2 || x.shape(1) != K) throw InvalidArgument("x must be [T, K] with K = " + std::to_string(K));
        const int64_t T = x.shape(0);
        py::array_t<float> y(std::vector<py::ssize_t>{py::ssize_t(T), py::ssize_t(N)});
        float* dst = y.mutable_data();
        if (T > 0) {
          py::gil_scoped_release release;
          b.matmul(x.data(), T, W, dst, N);
        }
        return y;
      }, py::arg("w"), py::arg("dtype"), py::arg("N"), py::arg("K"), py::arg("x"),
         "For tests: y [T, N] = x [T, K] @ W^T through Backend::matmul, W given as its .oelm bytes.")
      .def("kernel_row_to_f32", [](Backend& b, py::array_t<uint8_t, py::array::c_style> w, const std::string& dtype,
                                   int64_t N, int64_t K, int64_t row) {
        const TensorView W = weight_view(w, dtype, N, K);
        if (row < 0 || row >= N) throw InvalidArgument("row must be in [0, N)");
        row_to_f32_fn fn = b.kernels().row_to_f32[int(W.dtype)];
        if (!fn) throw InvalidArgument("no row_to_f32 kernel for " + dtype);
        py::array_t<float> out(py::ssize_t{K});
        fn(W.data, N, K, row, out.mutable_data());
        return out;
      }, py::arg("w"), py::arg("dtype"), py::arg("N"), py::arg("K"), py::arg("row"),
         "For tests: row `row` of W decoded to f32 by the backend's row_to_f32 kernel.")
      .def("kernel_quantize_row", [](Backend& b, py::array_t<float, py::array::c_style | py::array::forcecast> x) {
        if (x.ndim() != 1 || x.shape(0) < 1) throw InvalidArgument("x must be a non-empty 1-D array");
        if (!b.kernels().quantize_row) throw InvalidArgument("no quantize_row kernel");
        const int64_t K = x.shape(0), Kp = q_padded_k(K);
        py::array_t<int8_t> q(py::ssize_t{Kp});
        py::array_t<float> d(py::ssize_t{Kp / kQBlock});
        py::array_t<int32_t> s(py::ssize_t{Kp / kQBlock});
        b.kernels().quantize_row(x.data(), K, q.mutable_data(), d.mutable_data(), s.mutable_data());
        return py::make_tuple(q, d, s);
      }, py::arg("x"), "For tests: the backend's activation quantization of one row: (q [Kp], d [Kp/32], s [Kp/32]).")
      .def("read_bandwidth", [](Backend& b, size_t bytes, int reps) {
        py::gil_scoped_release release;
        return measure_read_bandwidth(b.pool(), bytes, reps);
      }, py::arg("bytes") = size_t(1) << 30, py::arg("reps") = 5,
         "Best-of-reps memory read bandwidth in bytes/s, using this backend's threads.");

  py::class_<Context, std::shared_ptr<Context>>(m, "Context")
      .def(py::init([](std::shared_ptr<Model> model, int64_t max_context, std::shared_ptr<Backend> backend) {
             if (!backend) backend = Backend::create("cpu", 0);
             return std::make_shared<Context>(std::move(model), std::move(backend), max_context);
           }),
           py::arg("model"), py::arg("max_context"), py::arg("backend") = nullptr)
      .def_property_readonly("n_past", &Context::n_past)
      .def_property_readonly("max_context", &Context::max_context)
      .def("reset", &Context::reset)
      .def("eval", [](Context& ctx, const std::vector<int64_t>& ids, bool all_logits) {
        const int64_t V = ctx.model().config().vocab_size;
        std::vector<int32_t> tok = to_ids(ids, V);
        if (tok.empty()) throw InvalidArgument("eval needs at least one token id");
        py::array_t<float> out(all_logits ? std::vector<py::ssize_t>{py::ssize_t(tok.size()), py::ssize_t(V)}
                                          : std::vector<py::ssize_t>{1, py::ssize_t(V)});
        float* dst = out.mutable_data();
        run_released([&] { ctx.eval(tok.data(), int64_t(tok.size()), all_logits, dst, python_interrupt); });
        return out;
      }, py::arg("token_ids"), py::arg("all_logits") = false);

  // The I/O engine's test hooks (tests/test_memory_budget.py): reads ranges of a file with
  // injected faults ("short": reads of at most a third of what was asked, rounded to 4 KiB
  // for direct reads; "eintr": every other call fails with EINTR first).
  m.def("_io_read", [](const std::string& path, std::vector<std::pair<uint64_t, uint64_t>> ranges,
                       const std::string& mode, int threads, const std::string& fault, bool keep) {
    static std::atomic<uint64_t> calls{0};
    IoEngine io(path, mode == "direct" ? IoEngine::Mode::direct : IoEngine::Mode::buffered, threads);
    const bool direct = io.mode() == IoEngine::Mode::direct;
    if (fault == "short")  // the whole request is read, fewer bytes reported (unaligned ones too)
      io.set_pread_for_testing(+[](int fd, void* b, size_t n, off_t o) -> ssize_t {
        const ssize_t r = ::pread(fd, b, n, o);
        return r > 0 ? std::min<ssize_t>(r, std::max<ssize_t>(IoEngine::kAlign + 100, ssize_t(n / 3) + 100)) : r;
      });
    else if (fault == "eintr")
      io.set_pread_for_testing(+[](int fd, void* b, size_t n, off_t o) -> ssize_t {
        if (calls.fetch_add(1) % 2 == 0) {
          errno = EINTR;
          return -1;
        }
        return ::pread(fd, b, n, o);
      });
    else if (!fault.empty())
      throw InvalidArgument("fault must be '', 'short' or 'eintr'");
    uint64_t total = 0;
    for (const auto& r : ranges) total += r.second;
    void* mem = nullptr;
    if (posix_memalign(&mem, IoEngine::kAlign, std::max<uint64_t>(total, 1))) throw std::bad_alloc();
    std::unique_ptr<void, void (*)(void*)> hold(mem, free);
    std::memset(mem, 0, total);  // pages faulted in before the timed reads
    std::vector<IoEngine::Range> rs;
    uint64_t at = 0;
    for (const auto& r : ranges) {
      rs.push_back({r.first, r.second, static_cast<uint8_t*>(mem) + at});
      at += r.second;
    }
    {
      py::gil_scoped_release release;
      io.read(rs);
    }
    const IoStats st = io.stats();
    py::dict d;
    d["data"] = keep ? py::bytes(static_cast<const char*>(mem), total) : py::bytes();
    d["mode"] = direct ? "direct" : "buffered";
    d["fell_back"] = io.fell_back();
    d["bytes"] = st.bytes;
    d["requests"] = st.requests;
    d["syscalls"] = st.syscalls;
    d["retries"] = st.retries;
    d["read_s"] = st.read_s;
    return d;
  }, py::arg("path"), py::arg("ranges"), py::arg("mode") = "direct", py::arg("threads") = 2, py::arg("fault") = "",
     py::arg("keep") = true);
  m.def("_coalesce", [](std::vector<std::pair<uint64_t, uint64_t>> ranges, uint64_t max_gap) {
    std::vector<std::tuple<uint64_t, uint64_t, uint64_t>> out;
    for (const IoGroup& g : coalesce(std::move(ranges), max_gap)) out.emplace_back(g.offset, g.length, g.buffer_offset);
    return out;
  }, py::arg("ranges"), py::arg("max_gap"));

  py::class_<Runtime, std::shared_ptr<Runtime>>(m, "Runtime")
      .def(py::init([](std::shared_ptr<Model> model, std::shared_ptr<Backend> backend, int64_t max_context,
                       int64_t kv_budget, int64_t block_size, const std::string& kv_dtype, int64_t max_step_tokens,
                       int32_t prefix_cache, int64_t budget_sequences, int64_t memory_budget,
                       const std::string& stream_io, int io_threads, bool prefetch) {
             RuntimeOptions o;
             o.memory_budget_bytes = memory_budget;
             o.stream.io = stream_io;
             o.stream.io_threads = io_threads;
             o.stream.prefetch = prefetch;
             o.budget_sequences = budget_sequences;
             o.max_context = max_context;
             o.kv_budget_bytes = kv_budget;
             o.block_size = block_size;
             if (kv_dtype != "f32" && kv_dtype != "f16")
               throw InvalidArgument("kv_dtype must be 'f32' or 'f16', got '" + kv_dtype + "'");
             o.kv_type = kv_dtype == "f16" ? KvType::f16 : KvType::f32;
             o.max_step_tokens = max_step_tokens;
             o.prefix_cache_entries = prefix_cache;
             std::shared_ptr<Runtime> rt;
             {
               py::gil_scoped_release release;
               rt = std::make_shared<Runtime>(std::move(model), std::move(backend), o);
             }
             return rt;
           }),
           py::arg("model"), py::arg("backend"), py::arg("max_context") = 0, py::arg("kv_budget") = 0,
           py::arg("block_size") = 0, py::arg("kv_dtype") = "f32", py::arg("max_step_tokens") = 0,
           py::arg("prefix_cache") = 0, py::arg("budget_sequences") = kDefaultBudgetSequences, py::arg("memory_budget") = 0,
           py::arg("stream_io") = "direct", py::arg("io_threads") = 4, py::arg("prefetch") = true)
      .def_property_readonly("memory_plan", [](Runtime& r) -> py::object {
        const MemoryPlan* p = r.memory_plan();
        if (!p) return py::none();
        py::dict d;
        d["budget"] = p->budget;
        d["model_bytes"] = p->model_bytes;
        d["resident_fixed"] = p->resident_fixed;
        d["resident_ffn"] = p->resident_ffn;
        d["kv_bytes"] = p->kv_bytes;
        d["scratch_bytes"] = p->scratch_bytes;
        d["io_bytes"] = p->io_bytes;
        d["other_bytes"] = p->other_bytes;
        d["streamed_bytes_per_step"] = p->streamed_bytes;
        d["total"] = p->total();
        d["minimum"] = p->minimum;
        py::list layers;
        py::list bundles;
        for (const MemoryPlan::Layer& l : p->layers) {
          py::list streamed;
          if (l.n_bundles > 0) {  // flash layout: [first streamed bundle, bundles]
            if (l.gate_up) streamed.append("bundles");
            bundles.append(py::make_tuple(l.first_bundle, l.n_bundles));
          } else {
            if (l.gate_up) streamed.append("gate_up");
            if (l.down) streamed.append("down");
          }
          layers.append(streamed);
        }
        d["streamed_layers"] = layers;
        d["streamed_bundles"] = bundles;
        d["text"] = p->text();
        const WeightStreamer* w = r.streamer();
        d["io"] = w ? py::object(py::str(w->io_fell_back() ? "buffered (O_DIRECT refused)" : w->options().io))
                    : py::object(py::none());
        return d;
      })
      .def_property_readonly("stream_stats", [](Runtime& r) -> py::object {
        const WeightStreamer* w = r.streamer();
        if (!w) return py::none();
        const StreamStats st = w->stats();
        py::dict d;
        d["bytes_read"] = st.io.bytes;
        d["requests"] = st.io.requests;
        d["syscalls"] = st.io.syscalls;
        d["retries"] = st.io.retries;
        d["read_s"] = st.io.read_s;
        d["wait_s"] = st.wait_s;
        d["layers_streamed"] = st.layers_streamed;
        return d;
      })
      .def("ffn_probe_start", [](Runtime& r) { r.set_ffn_probe(true); },
           "Record FFN activations of every later step (the flash layout's calibration).")
      .def("ffn_probe_take", [](Runtime& r) {
             const FfnProbe* p = r.ffn_probe();
             if (!p) throw InvalidArgument("no FFN probe is running; call ffn_probe_start() first");
             py::list active, magnitude;
             for (size_t i = 0; i < p->active.size(); ++i) {
               active.append(py::array_t<double>(py::ssize_t(p->active[i].size()), p->active[i].data()));
               magnitude.append(py::array_t<double>(py::ssize_t(p->magnitude[i].size()), p->magnitude[i].data()));
             }
             py::dict d;
             d["active"] = active;
             d["magnitude"] = magnitude;
             d["tokens"] = p->tokens;
             r.set_ffn_probe(false);
             return d;
           },
           "Stop recording; per layer and neuron: tokens with |act| above the token's mean |act| over the layer "
           "(\"active\"), the sum of |act| (\"magnitude\"), and the tokens recorded.")
      .def_property_readonly("max_context", &Runtime::max_context)
      .def_property_readonly("max_step_tokens", &Runtime::max_step_tokens)
      .def_property_readonly("kv_budget", &Runtime::kv_budget_bytes)
      .def_property_readonly("kv_block_size", [](Runtime& r) { return r.kv().block_size(); })
      .def_property_readonly("kv_blocks", [](Runtime& r) { return r.kv().n_blocks(); })
      .def_property_readonly("kv_blocks_free", [](Runtime& r) { return r.kv().n_free(); })
      .def_property_readonly("kv_budget_text", [](Runtime& r) { return r.kv().budget_text(); })
      .def_property_readonly("n_seqs", &Runtime::n_seqs)
      .def_property_readonly("prefix_cache_entries", [](Runtime& r) { return r.prefix_cache().size(); })
      .def_property_readonly("tokens_forwarded", &Runtime::tokens_forwarded)
      .def_property_readonly("steps", &Runtime::steps)
      .def("clear_prefix_cache", [](Runtime& r) { r.prefix_cache().clear(r.kv()); })
      .def("seq_new", &Runtime::seq_new)
      .def("seq_fork", &Runtime::seq_fork, py::arg("parent"), py::arg("n") = -1)
      .def("seq_truncate", &Runtime::seq_truncate, py::arg("seq"), py::arg("n"))
      .def("seq_free", &Runtime::seq_free, py::arg("seq"))
      .def("seq_len", &Runtime::seq_len, py::arg("seq"))
      .def("seq_tokens", &Runtime::seq_tokens, py::arg("seq"))
      .def("seq_blocks", [](Runtime& r, int32_t id) { return r.seq_kv(id).blocks; }, py::arg("seq"))
      .def("block_refcount", [](Runtime& r, int32_t id) {
        if (id < 0 || id >= r.kv().n_blocks()) throw InvalidArgument("no such block");
        return r.kv().refcount(id);
      }, py::arg("block"))
      .def("eval", [](Runtime& r, const std::vector<std::tuple<int32_t, py::object, std::string>>& entries) {
        // entries: (seq, token ids, "none" | "last" | "all"); returns the logits rows [rows, V]
        const int64_t V = r.model().config().vocab_size;
        std::vector<std::vector<int32_t>> toks;
        std::vector<Runtime::EvalEntry> es;
        for (const auto& [seq, ids, mode] : entries) {
          toks.push_back(ids_arg(ids, V, "token_ids"));
          if (mode != "none" && mode != "last" && mode != "all")
            throw InvalidArgument("logits must be 'none', 'last' or 'all', got '" + mode + "'");
        }
        for (size_t i = 0; i < entries.size(); ++i) {
          const std::string& mode = std::get<2>(entries[i]);
          es.push_back({std::get<0>(entries[i]), toks[i].data(), int64_t(toks[i].size()),
                        mode == "all" ? Runtime::Logits::all : mode == "last" ? Runtime::Logits::last
                                                                              : Runtime::Logits::none});
        }
        py::array_t<float> out(std::vector<py::ssize_t>{py::ssize_t(Runtime::logit_rows(es)), py::ssize_t(V)});
        float* dst = out.mutable_data();
        run_released([&] { r.eval(es, dst, python_interrupt); });
        return out;
      }, py::arg("entries"))
      .def("score_batch", [](Runtime& r, const py::list& pairs) {
        const int64_t V = r.model().config().vocab_size;
        std::vector<std::pair<std::vector<int32_t>, std::vector<int32_t>>> in;
        for (const py::handle& p : pairs) {
          const py::tuple t = p.cast<py::tuple>();
          if (t.size() != 2) throw InvalidArgument("each pair must be (context_ids, continuation_ids)");
          in.emplace_back(ids_arg(t[0], V, "context_ids"), ids_arg(t[1], V, "continuation_ids"));
        }
        std::vector<ScoreResult> res;
        ScoreStats st;
        run_released([&] { res = r.score_batch(in, python_interrupt, &st); });
        py::list out;
        for (const ScoreResult& x : res)
          out.append(py::make_tuple(py::array_t<double>(py::ssize_t(x.logprobs.size()), x.logprobs.data()),
                                    x.is_greedy));
        py::dict stats;
        stats["pairs"] = st.pairs;
        stats["tokens_requested"] = st.tokens_requested;
        stats["tokens_forwarded"] = st.tokens_forwarded;
        stats["steps"] = st.steps;
        return py::make_tuple(out, stats);
      }, py::arg("pairs"));

  py::class_<PyEngine>(m, "Engine")
      .def(py::init([](std::shared_ptr<Runtime> rt, int32_t max_batch, int64_t max_queue, int64_t prefill_chunk) {
             EngineOptions o;
             o.max_batch = max_batch;
             o.max_queue = max_queue;
             o.prefill_chunk = prefill_chunk;
             auto p = std::make_unique<PyEngine>();
             p->eng = std::make_unique<Engine>(rt, o);
             p->rt = std::move(rt);
             return p;
           }),
           py::arg("runtime"), py::arg("max_batch") = 16, py::arg("max_queue") = 0,
           py::arg("prefill_chunk") = kDefaultPrefillChunk,
           "prefill_chunk: prompt tokens per step while any sequence decodes (0: up to the step budget).")
      .def("submit", [](PyEngine& e, const py::object& prompt, float temperature, int32_t top_k, float top_p,
                        float min_p, float repetition_penalty, uint64_t seed, int64_t max_new_tokens,
                        std::vector<std::string> stop, int32_t logprobs, bool prompt_logprobs, bool reuse_prefix) {
        GenerateRequest req;
        req.prompt = ids_arg(prompt, e.rt->model().config().vocab_size, "prompt");
        req.sampling = SamplingParams{temperature, top_k, top_p, min_p, repetition_penalty, seed};
        req.max_new_tokens = max_new_tokens;
        req.stop = std::move(stop);
        req.logprobs = logprobs;
        req.prompt_logprobs = prompt_logprobs;
        req.reuse_prefix = reuse_prefix;
        return e.eng->submit(std::move(req));
      }, py::arg("prompt"), py::arg("temperature") = 0.0f, py::arg("top_k") = 0, py::arg("top_p") = 1.0f,
         py::arg("min_p") = 0.0f, py::arg("repetition_penalty") = 1.0f, py::arg("seed") = 0,
         py::arg("max_new_tokens") = 128, py::arg("stop") = std::vector<std::string>{}, py::arg("logprobs") = -1,
         py::arg("prompt_logprobs") = false, py::arg("reuse_prefix") = true)
      .def("cancel", [](PyEngine& e, uint64_t id) { return e.eng->cancel(id); }, py::arg("id"))
      .def("step", [](PyEngine& e) {
        bool did = false;
        run_released([&] { did = e.eng->step(python_interrupt); });
        return did;
      }, "One engine step without the GIL (Ctrl-C abandons it and raises KeyboardInterrupt).")
      .def("take_events", [](PyEngine& e) {
        std::vector<Event> ev = e.eng->take_events();
        return event_list(ev);
      })
      .def("wait_events", [](PyEngine& e, double timeout) {
        std::vector<Event> ev;
        {
          py::gil_scoped_release release;
          e.eng->wait_events(ev, timeout);
        }
        return event_list(ev);
      }, py::arg("timeout"), "Events, waiting up to `timeout` seconds (without the GIL) for the first.")
      .def("event_fd", [](PyEngine& e) { return e.eng->event_fd(); },
           "A descriptor readable while events wait to be taken (for asyncio's add_reader; "
           "take_events drains it); -1 where unsupported.")
      .def("start", [](PyEngine& e) { e.eng->start(); }, "Step on a thread of the engine's own.")
      .def("stop", [](PyEngine& e) {
        py::gil_scoped_release release;
        e.eng->stop();
      })
      .def_property_readonly("idle", [](PyEngine& e) { return e.eng->idle(); })
      .def_property_readonly("max_batch", [](PyEngine& e) { return e.eng->options().max_batch; })
      .def_property_readonly("prefill_chunk", [](PyEngine& e) { return e.eng->options().prefill_chunk; })
      .def("stats", [](PyEngine& e) {
        const Engine::Stats s = e.eng->stats();
        py::dict d;
        d["running"] = s.running;
        d["waiting"] = s.waiting;
        d["submitted"] = s.submitted;
        d["finished"] = s.finished;
        d["cancelled"] = s.cancelled;
        d["preempted"] = s.preempted;
        d["steps"] = s.steps;
        d["step_tokens"] = s.step_tokens;
        d["decode_rows"] = s.decode_rows;
        d["mixed_steps"] = s.mixed_steps;
        d["prompt_tokens"] = s.prompt_tokens;
        d["cached_tokens"] = s.cached_tokens;
        d["generated"] = s.generated;
        return d;
      });

  // The engine's per-request sampler and text stream, for generation loops written in Python
  // (speculative decoding): the same draws from the same seed, the same pieces and stop rule.
  py::class_<Sampler>(m, "Sampler")
      .def(py::init([](float temperature, int32_t top_k, float top_p, float min_p, float repetition_penalty,
                       uint64_t seed) {
             return std::make_unique<Sampler>(SamplingParams{temperature, top_k, top_p, min_p, repetition_penalty, seed});
           }),
           py::arg("temperature") = 0.0f, py::arg("top_k") = 0, py::arg("top_p") = 1.0f, py::arg("min_p") = 0.0f,
           py::arg("repetition_penalty") = 1.0f, py::arg("seed") = 0)
      .def("sample", [](Sampler& s, py::array_t<float, py::array::c_style | py::array::forcecast> logits,
                        const std::vector<int32_t>& history) {
        if (logits.ndim() != 1) throw InvalidArgument("logits must be a 1-D array");
        return s.sample(logits.data(), logits.shape(0), history);
      }, py::arg("logits"), py::arg("history"),
         "The next token (Engine semantics: penalty over `history`, filters, one seeded draw; argmax when greedy).")
      .def("probs", [](Sampler& s, py::array_t<float, py::array::c_style | py::array::forcecast> logits,
                       const std::vector<int32_t>& history) {
        if (logits.ndim() != 1) throw InvalidArgument("logits must be a 1-D array");
        std::vector<float> p;
        s.probs(logits.data(), logits.shape(0), history, p);
        return py::array_t<float>(py::ssize_t(p.size()), p.data());
      }, py::arg("logits"), py::arg("history"), "The distribution sample() draws from (one-hot when greedy).")
      .def("uniform", &Sampler::uniform, "A uniform draw in [0, 1) from the sampler's generator.");

  py::class_<TextStream>(m, "TextStream")
      .def(py::init([](const Tokenizer& tok, const std::vector<int32_t>& prompt, std::vector<std::string> stops) {
             for (const std::string& s : stops)
               if (s.empty()) throw InvalidArgument("a stop string is empty; stop strings must be non-empty");
             return std::make_unique<TextStream>(tok, prompt.data(), int64_t(prompt.size()), std::move(stops));
           }),
           py::arg("tokenizer"), py::arg("prompt"), py::arg("stops"), py::keep_alive<1, 2>())
      .def("push", [](TextStream& t, int32_t token) {
        bool stopped = false;
        std::string piece = t.push(token, &stopped);
        return py::make_tuple(py::str(piece), stopped);
      }, py::arg("token"), "(text now safe to emit, a stop string appeared)")
      .def("finish", [](TextStream& t) {
        bool stopped = false;
        std::string piece = t.finish(&stopped);
        return py::make_tuple(py::str(piece), stopped);
      }, "(the held text, a stop string appeared in it)");

  m.def("sampling_probs",
        [](py::array_t<float, py::array::c_style | py::array::forcecast> logits, const std::vector<int64_t>& prev_ids,
           float temperature, int32_t top_k, float top_p, float min_p, float repetition_penalty) {
          if (logits.ndim() != 1) throw InvalidArgument("logits must be a 1-D array");
          const int64_t V = logits.shape(0);
          Sampler s(SamplingParams{temperature, top_k, top_p, min_p, repetition_penalty, 0});
          std::vector<int32_t> hist = to_ids(prev_ids, V);
          std::vector<float> probs;
          s.probs(logits.data(), V, hist, probs);
          return py::array_t<float>(py::ssize_t(probs.size()), probs.data());
        },
        py::arg("logits"), py::arg("prev_ids"), py::arg("temperature") = 1.0f, py::arg("top_k") = 0,
        py::arg("top_p") = 1.0f, py::arg("min_p") = 0.0f, py::arg("repetition_penalty") = 1.0f,
        "The exact distribution the sampler draws from (for tests).");

  m.attr("VERSION") = reader_version();  // the core's; must equal openelm_rt.__version__
  m.attr("FORMAT_VERSION") = kFormatVersion;
  m.attr("NAMES_VERSION") = kNamesVersion;
}
