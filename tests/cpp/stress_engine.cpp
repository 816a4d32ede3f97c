// Stress test of the engine's concurrency, meant to run under ThreadSanitizer (and natively
// as a ctest): an engine thread steps one session while submitter threads queue requests,
// a canceller thread cancels some of them (queued, running, finished or unknown ids), a
// poller collects events, and the main thread evaluates its own sequences through the same
// session between steps. Checks: every request ends exactly once; a request that was not
// cancelled gives exactly the tokens it gives alone; the session's own sequences are
// unaffected; nothing leaks (every sequence freed leaves the KV pool as it was).
//   stress_engine MODEL.oelm [rounds]   (tests/cpp/run.sh passes the fixture model)
#include <openelm_rt/openelm_rt.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <map>
#include <mutex>
#include <random>
#include <string>
#include <thread>
#include <vector>

namespace {

[[noreturn]] void die(const std::string& what) {
  std::fprintf(stderr, "stress_engine: %s (last error: %s)\n", what.c_str(), oelm_last_error());
  std::exit(1);
}
void ok(oelm_status st, const char* call) {
  if (st != OELM_OK) die(std::string(call) + " returned " + oelm_status_name(st));
}

struct Job {
  std::vector<int32_t> prompt;
  oelm_request_params params;
  std::vector<int32_t> alone;  // the tokens it gives by itself
};

std::vector<int32_t> run_alone(oelm_session* s, const Job& j) {
  oelm_request r;
  ok(oelm_session_submit(s, j.prompt.data(), j.prompt.size(), &j.params, &r), "submit");
  std::vector<int32_t> toks;
  for (;;) {
    int32_t busy = 0;
    ok(oelm_session_step(s, &busy), "step");
    oelm_event ev[4];
    size_t n = 0;
    ok(oelm_session_poll(s, ev, 4, &n, 0), "poll");
    for (size_t i = 0; i < n; ++i) {
      if (ev[i].token >= 0) toks.push_back(ev[i].token);
      if (ev[i].finish != OELM_FINISH_NONE) return toks;
    }
  }
}

}  // namespace

int main(int argc, char** argv) {
  std::string path = argc > 1 ? argv[1] : "";
  if (path.empty() && std::getenv("OELM_TEST_DATA")) path = std::string(std::getenv("OELM_TEST_DATA")) + "/model.oelm";
  if (path.empty()) {
    std::fprintf(stderr, "usage: stress_engine MODEL.oelm [rounds]  (or set OELM_TEST_DATA)\n");
    return 2;
  }
  const int rounds = argc > 2 ? std::atoi(argv[2]) : 4;
  oelm_model_options o = oelm_model_options_default();
  o.n_threads = 2;
  o.max_context = 256;
  o.max_batch = 5;
  oelm_model* model;
  ok(oelm_model_load(path.c_str(), &o, &model), "oelm_model_load");
  oelm_session* s;
  ok(oelm_session_new(model, &s), "oelm_session_new");
  const int32_t V = oelm_model_vocab_size(model);

  std::mt19937 rng(7);
  std::vector<Job> jobs(24);
  for (size_t i = 0; i < jobs.size(); ++i) {
    Job& j = jobs[i];
    j.prompt.push_back(1);
    const size_t n = 1 + rng() % 40;
    for (size_t k = 0; k < n; ++k) j.prompt.push_back(int32_t(3 + rng() % uint32_t(V - 3)));
    j.params = oelm_request_params_default();
    j.params.max_new_tokens = int32_t(1 + rng() % 24);
    if (i % 2) {
      j.params.sampling.temperature = 0.9f;
      j.params.sampling.top_p = 0.9f;
      j.params.sampling.seed = i;
    }
    j.params.reuse_prefix = int32_t(i % 3 != 0);
    j.alone = run_alone(s, j);
  }
  // The session's own sequence, evaluated by the main thread while the engine runs.
  const int32_t own[] = {1, 50, 60, 70};
  std::vector<float> ref(static_cast<size_t>(V));
  ok(oelm_session_eval(s, own, 4, nullptr), "eval");
  std::copy(oelm_session_logits(s), oelm_session_logits(s) + V, ref.begin());

  ok(oelm_session_start(s), "start");
  for (int round = 0; round < rounds; ++round) {
    std::mutex mu;
    std::map<oelm_request, size_t> which;
    std::vector<oelm_request> issued;
    std::atomic<bool> submitted{false};
    std::vector<std::thread> threads;
    const size_t n_sub = 4;
    for (size_t t = 0; t < n_sub; ++t)
      threads.emplace_back([&, t] {
        for (size_t i = t; i < jobs.size(); i += n_sub) {
          oelm_request r;
          ok(oelm_session_submit(s, jobs[i].prompt.data(), jobs[i].prompt.size(), &jobs[i].params, &r), "submit");
          std::lock_guard<std::mutex> lk(mu);
          which[r] = i;
          issued.push_back(r);
        }
      });
    std::thread canceller([&] {
      std::mt19937 crng{static_cast<uint32_t>(round)};
      while (!submitted.load()) {
        oelm_request r = 0;
        {  // a third of the jobs get cancelled, at random moments (queued, running or finished)
          std::lock_guard<std::mutex> lk(mu);
          if (!issued.empty()) r = issued[crng() % issued.size()];
          if (r && which[r] % 3 != 0) r = 0;
        }
        if (r) ok(oelm_session_cancel(s, r), "cancel");
        ok(oelm_session_cancel(s, 1u << 30), "cancel unknown");
        std::this_thread::sleep_for(std::chrono::microseconds(50));
      }
    });
    std::map<oelm_request, std::vector<int32_t>> toks;
    std::map<oelm_request, int> finals;
    std::map<oelm_request, oelm_finish_reason> finish;
    std::thread poller([&] {
      size_t done = 0;
      const auto deadline = std::chrono::steady_clock::now() + std::chrono::seconds(120);
      while (done < jobs.size()) {
        if (std::chrono::steady_clock::now() > deadline) die("requests did not finish within 120 s");
        oelm_event ev[8];
        size_t n = 0;
        ok(oelm_session_poll(s, ev, 8, &n, 0.05), "poll");
        for (size_t i = 0; i < n; ++i) {
          if (ev[i].token >= 0) toks[ev[i].request].push_back(ev[i].token);
          if (ev[i].finish != OELM_FINISH_NONE) {
            ++finals[ev[i].request];
            finish[ev[i].request] = ev[i].finish;
            ++done;
          }
        }
      }
    });
    for (int k = 0; k < 20; ++k) {  // the main thread's own work between steps
      oelm_session_reset(s);
      ok(oelm_session_eval(s, own, 4, nullptr), "eval");
      if (!std::equal(ref.begin(), ref.end(), oelm_session_logits(s))) die("the session's own logits changed");
    }
    for (auto& th : threads) th.join();
    submitted.store(true);
    canceller.join();
    poller.join();
    for (const auto& [r, i] : which) {
      if (finals[r] != 1) die("request " + std::to_string(r) + " ended " + std::to_string(finals[r]) + " times");
      const std::vector<int32_t>& got = toks[r];
      const std::vector<int32_t>& want = jobs[i].alone;
      if (finish[r] == OELM_FINISH_CANCELLED) {
        if (got.size() > want.size() || !std::equal(got.begin(), got.end(), want.begin()))
          die("a cancelled request's tokens are not a prefix of its tokens alone");
      } else if (got != want) {
        die("request for job " + std::to_string(i) + " gave other tokens than alone");
      }
    }
    std::printf("round %d: %zu requests, %zu cancelled\n", round, which.size(),
                size_t(std::count_if(finish.begin(), finish.end(),
                                     [](const auto& kv) { return kv.second == OELM_FINISH_CANCELLED; })));
  }
  oelm_session_stop(s);
  oelm_session_free(s);
  oelm_model_free(model);
  std::printf("stress_engine: ok\n");
  return 0;
}
