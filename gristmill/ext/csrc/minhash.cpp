// MinHash near dedup on the CPU: word shingles, signatures and LSH band keys.
//
// Every function computes exactly what the numpy code of
// gristmill/selectors/minhash.py computes (same constants, same wrapping uint32 /
// uint64 arithmetic), so the two paths give bit-identical results; the tests
// compare them on random documents for every scheme.
//
// The signature of a record with shingle hashes x is, per permutation j,
//
//     affine32: sig_j = min_x (a_j * fmix32(x) + b_j) mod 2^32
//     legacy:   sig_j = min_x ((a_j * x + b_j) mod 2^64 mod (2^61 - 1)) mod 2^32
//
// (datasketch's two schemes; Broder 1997). The loop over j is written as plain
// lanes the compiler vectorizes; it is built twice, for AVX2 and for the baseline
// x86-64 (SSE2), and the AVX2 copy runs when the CPU has it, so the library needs
// no -march flag.

#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <stdexcept>
#include <string>
#include <utility>
#include <vector>

namespace py = pybind11;

namespace {

constexpr uint64_t kMersenne = (uint64_t{1} << 61) - 1;
constexpr uint64_t kLow32 = 0xFFFFFFFFull;

inline uint64_t fmix64(uint64_t x) {
  x ^= x >> 33;
  x *= 0xFF51AFD7ED558CCDull;
  x ^= x >> 33;
  x *= 0xC4CEB9FE1A85EC53ull;
  return x ^ (x >> 33);
}

inline uint32_t fmix32(uint32_t x) {
  x ^= x >> 16;
  x *= 0x85EBCA6Bu;
  x ^= x >> 13;
  x *= 0xC2B2AE35u;
  return x ^ (x >> 16);
}

// Which compiled copy of the signature loops runs: "avx2", "sse4.1" or "base".
// `want` is "auto" (the widest this CPU has) or one of those, which must not be
// wider than the CPU; tests force each one.
std::string pick_isa(const std::string& want) {
  std::string best = "base";
#if defined(__x86_64__) || defined(__i386__)
  if (__builtin_cpu_supports("avx2")) {
    best = "avx2";
  } else if (__builtin_cpu_supports("sse4.1")) {
    best = "sse4.1";
  }
#endif
  if (want == "auto") return best;
  const std::string order[] = {"base", "sse4.1", "avx2"};
  const auto rank = [&](const std::string& isa) {
    for (int i = 0; i < 3; ++i) {
      if (order[i] == isa) return i;
    }
    throw std::invalid_argument("isa must be auto, avx2, sse4.1 or base; got " + isa);
  };
  if (rank(want) > rank(best)) throw std::invalid_argument("this CPU has no " + want);
  return want;
}

// uint32 lanes as one value (GCC vector extension): eight for an AVX2 register,
// four for an SSE one, without intrinsics tied to an instruction set. Aligned to
// 4 and may_alias, so any uint32_t* can be read and written through them.
typedef uint32_t v8u __attribute__((vector_size(32), aligned(4), may_alias));
typedef uint32_t v4u __attribute__((vector_size(16), aligned(4), may_alias));

// The same bodies compiled for several targets: `ATTR` is empty (baseline x86-64),
// target("sse4.1") (pmulld, pminud) or target("avx2"), with vectors `V` of `W`
// lanes, one register wide. affine32 takes each run of shingles of one record and
// 4 W permutations at a time, so their running minima and a, b stay in 12
// registers while the run streams past.
#define GRISTMILL_MINHASH_KERNELS(SUFFIX, ATTR, V, W)                                       \
  ATTR void affine32_##SUFFIX(const uint32_t* __restrict x, const int64_t* __restrict d,    \
                              int64_t n, const uint32_t* __restrict a,                      \
                              const uint32_t* __restrict b, int64_t k,                      \
                              uint32_t* __restrict sig) {                                   \
    for (int64_t s = 0, e = 0; s < n; s = e) {                                              \
      for (e = s + 1; e < n && d[e] == d[s]; ++e) {                                         \
      }                                                                                     \
      uint32_t* __restrict row = sig + d[s] * k;                                            \
      int64_t j = 0;                                                                        \
      for (; j + 4 * W <= k; j += 4 * W) {                                                  \
        V m0 = *(const V*)(row + j), m1 = *(const V*)(row + j + W);                         \
        V m2 = *(const V*)(row + j + 2 * W), m3 = *(const V*)(row + j + 3 * W);             \
        const V a0 = *(const V*)(a + j), a1 = *(const V*)(a + j + W);                       \
        const V a2 = *(const V*)(a + j + 2 * W), a3 = *(const V*)(a + j + 3 * W);           \
        const V b0 = *(const V*)(b + j), b1 = *(const V*)(b + j + W);                       \
        const V b2 = *(const V*)(b + j + 2 * W), b3 = *(const V*)(b + j + 3 * W);           \
        for (int64_t i = s; i < e; ++i) {                                                   \
          const V xi = V{} + x[i];                                                          \
          const V y0 = a0 * xi + b0, y1 = a1 * xi + b1;                                     \
          const V y2 = a2 * xi + b2, y3 = a3 * xi + b3;                                     \
          m0 = y0 < m0 ? y0 : m0;                                                           \
          m1 = y1 < m1 ? y1 : m1;                                                           \
          m2 = y2 < m2 ? y2 : m2;                                                           \
          m3 = y3 < m3 ? y3 : m3;                                                           \
        }                                                                                   \
        *(V*)(row + j) = m0;                                                                \
        *(V*)(row + j + W) = m1;                                                            \
        *(V*)(row + j + 2 * W) = m2;                                                        \
        *(V*)(row + j + 3 * W) = m3;                                                        \
      }                                                                                     \
      for (int64_t i = s; i < e; ++i) {                                                     \
        for (int64_t jj = j; jj < k; ++jj) {                                                \
          const uint32_t y = a[jj] * x[i] + b[jj];                                          \
          row[jj] = y < row[jj] ? y : row[jj];                                              \
        }                                                                                   \
      }                                                                                     \
    }                                                                                       \
  }                                                                                         \
  /* a * x with x < 2^32 as two 32x32->64 products: what the vector units have */           \
  ATTR void legacy_##SUFFIX(const uint32_t* __restrict h, const int64_t* __restrict d,      \
                            int64_t n, const uint32_t* __restrict a_lo,                     \
                            const uint32_t* __restrict a_hi,                                \
                            const uint64_t* __restrict b, int64_t k,                        \
                            int64_t* __restrict sig) {                                      \
    for (int64_t i = 0; i < n; ++i) {                                                       \
      const uint64_t x = h[i];                                                              \
      int64_t* __restrict row = sig + d[i] * k;                                             \
      for (int64_t j = 0; j < k; ++j) {                                                     \
        uint64_t y = uint64_t{a_lo[j]} * x + ((uint64_t{a_hi[j]} * x) << 32) + b[j];        \
        y = (y & kMersenne) + (y >> 61);                                                    \
        y -= y >= kMersenne ? kMersenne : 0;                                                \
        /* below 2^32 now: a signed minimum is the unsigned one */                          \
        const int64_t v = static_cast<int64_t>(y & kLow32);                                 \
        row[j] = v < row[j] ? v : row[j];                                                   \
      }                                                                                     \
    }                                                                                       \
  }

GRISTMILL_MINHASH_KERNELS(base, , v4u, 4)
#if defined(__x86_64__) || defined(__i386__)
GRISTMILL_MINHASH_KERNELS(sse41, __attribute__((target("sse4.1"))), v4u, 4)
GRISTMILL_MINHASH_KERNELS(avx2, __attribute__((target("avx2"))), v8u, 8)
#endif

using U8 = py::array_t<uint8_t, py::array::c_style | py::array::forcecast>;
using I16 = py::array_t<int16_t, py::array::c_style | py::array::forcecast>;
using U32 = py::array_t<uint32_t, py::array::c_style | py::array::forcecast>;
using I64 = py::array_t<int64_t, py::array::c_style | py::array::forcecast>;
using U64 = py::array_t<uint64_t, py::array::c_style | py::array::forcecast>;

void check_docs(const I64& docs, int64_t n, int64_t n_docs) {
  const int64_t* d = docs.data();
  for (int64_t i = 0; i < n; ++i) {
    if (d[i] < 0 || d[i] >= n_docs) throw std::out_of_range("record index out of range");
  }
}

py::array_t<uint32_t> affine32_signatures(const U32& h, const I64& docs, int64_t n_docs,
                                          const U32& a, const U32& b,
                                          const std::string& isa) {
  const int64_t n = h.size(), k = a.size();
  if (docs.size() != n || b.size() != k) throw std::invalid_argument("length mismatch");
  check_docs(docs, n, n_docs);
  const std::string run = pick_isa(isa);
  py::array_t<uint32_t> out({n_docs, k});
  uint32_t* sig = out.mutable_data();
  {
    py::gil_scoped_release nogil;
    std::fill(sig, sig + n_docs * k, 0xFFFFFFFFu);
    std::vector<uint32_t> x(n);
    for (int64_t i = 0; i < n; ++i) x[i] = fmix32(h.data()[i]);
#if defined(__x86_64__) || defined(__i386__)
    if (run == "avx2") {
      affine32_avx2(x.data(), docs.data(), n, a.data(), b.data(), k, sig);
    } else if (run == "sse4.1") {
      affine32_sse41(x.data(), docs.data(), n, a.data(), b.data(), k, sig);
    } else {
      affine32_base(x.data(), docs.data(), n, a.data(), b.data(), k, sig);
    }
#else
    affine32_base(x.data(), docs.data(), n, a.data(), b.data(), k, sig);
#endif
  }
  return out;
}

py::array_t<uint64_t> legacy_signatures(const U32& h, const I64& docs, int64_t n_docs,
                                        const U64& a, const U64& b,
                                        const std::string& isa) {
  const int64_t n = h.size(), k = a.size();
  if (docs.size() != n || b.size() != k) throw std::invalid_argument("length mismatch");
  check_docs(docs, n, n_docs);
  const std::string run = pick_isa(isa);
  py::array_t<uint64_t> out({n_docs, k});
  int64_t* sig = reinterpret_cast<int64_t*>(out.mutable_data());
  {
    py::gil_scoped_release nogil;
    std::vector<uint32_t> a_lo(k), a_hi(k);
    for (int64_t j = 0; j < k; ++j) {
      a_lo[j] = static_cast<uint32_t>(a.data()[j]);
      a_hi[j] = static_cast<uint32_t>(a.data()[j] >> 32);
    }
    std::fill(sig, sig + n_docs * k, static_cast<int64_t>(kLow32));
#if defined(__x86_64__) || defined(__i386__)
    if (run == "avx2") {
      legacy_avx2(h.data(), docs.data(), n, a_lo.data(), a_hi.data(), b.data(), k, sig);
    } else if (run == "sse4.1") {
      legacy_sse41(h.data(), docs.data(), n, a_lo.data(), a_hi.data(), b.data(), k, sig);
    } else {
      legacy_base(h.data(), docs.data(), n, a_lo.data(), a_hi.data(), b.data(), k, sig);
    }
#else
    legacy_base(h.data(), docs.data(), n, a_lo.data(), a_hi.data(), b.data(), k, sig);
#endif
  }
  return out;
}

// One permutation hashing (Li, Owen & Zhang 2012): one 64-bit hash per shingle,
// the upper half picks the bin, the lower half is the value; empty bins of a record
// with shingles copy the bin that fmix64(bin * m125 + attempt) mod k points at,
// for attempt = 1, 2, ... until that bin was filled (Shrivastava 2017).
py::array_t<uint32_t> one_permutation_signatures(const U32& h, const I64& docs, int64_t n_docs,
                                                 int64_t k, uint64_t seed_mult, uint64_t m125) {
  const int64_t n = h.size();
  if (docs.size() != n) throw std::invalid_argument("length mismatch");
  check_docs(docs, n, n_docs);
  py::array_t<uint32_t> out({n_docs, k});
  uint32_t* sig = out.mutable_data();
  {
    py::gil_scoped_release nogil;
    const uint32_t* hp = h.data();
    const int64_t* d = docs.data();
    std::fill(sig, sig + n_docs * k, 0xFFFFFFFFu);
    std::vector<uint8_t> has(n_docs, 0);
    for (int64_t i = 0; i < n; ++i) {
      const uint64_t g = fmix64(uint64_t{hp[i]} ^ seed_mult);
      const int64_t bin = static_cast<int64_t>((g >> 32) % static_cast<uint64_t>(k));
      uint32_t& cell = sig[d[i] * k + bin];
      cell = std::min(cell, static_cast<uint32_t>(g & kLow32));
      has[d[i]] = 1;
    }
    std::vector<uint8_t> filled(k);
    for (int64_t r = 0; r < n_docs; ++r) {
      if (!has[r]) continue;
      uint32_t* row = sig + r * k;
      for (int64_t c = 0; c < k; ++c) filled[c] = row[c] != 0xFFFFFFFFu;
      for (int64_t c = 0; c < k; ++c) {
        if (filled[c]) continue;
        for (int64_t attempt = 1; attempt < 64 * k; ++attempt) {
          const uint64_t src =
              fmix64(static_cast<uint64_t>(c) * m125 + static_cast<uint64_t>(attempt)) %
              static_cast<uint64_t>(k);
          if (filled[src]) {
            row[c] = row[src];
            break;
          }
        }
      }
    }
  }
  return out;
}

// Word n-gram shingles, as shingle_hashes(hash="fast") computes them, in two calls.
//
// word_tokens splits every text into words where pyarrow's utf8_split_whitespace
// does: at the ASCII bytes `table` marks -1 and at the non-ASCII code points in
// `spaces` (both asked of pyarrow by the caller). A word of ASCII bytes is
// normalized by `table` (-2: removed, else the byte it becomes, i.e. lower case)
// and hashed here: fmix64(sum_i (c_i + 1) * M[i mod 64] + (i >> 6) * M[64]
// ^ len * M[65]) over its normalized bytes c_i, and dropped if none are left. A
// word with any non-ASCII byte follows Unicode's case and punctuation rules: its
// bytes are handed back ("foreign" words) for pyarrow to normalize and numpy to
// hash, and its token holds its foreign index until word_ngrams.
py::tuple word_tokens(const I64& offsets, const U8& data, const I16& table, const U64& mult,
                      const U32& spaces) {
  const int64_t n_docs = offsets.size() - 1;
  if (table.size() != 128 || mult.size() != 128) {
    throw std::invalid_argument("table and mult need 128 entries");
  }
  const int64_t* off = offsets.data();
  if (n_docs < 0 || off[0] < 0 || off[n_docs] > data.size()) {
    throw std::out_of_range("offsets beyond the data");
  }
  std::vector<uint64_t> tok;
  std::vector<uint8_t> foreign, foreign_bytes;
  std::vector<int64_t> counts(n_docs), foreign_offsets{0};
  {
    py::gil_scoped_release nogil;
    const uint8_t* bytes = data.data();
    const int16_t* map = table.data();
    const uint64_t* m = mult.data();
    const uint32_t* sp = spaces.data();
    const int64_t n_spaces = spaces.size();
    tok.reserve(static_cast<size_t>(off[n_docs] / 4 + 16));
    foreign.reserve(tok.capacity());
    // the rare case out of the byte loop: a non-ASCII word's bytes go back to Python
    const auto end_foreign_word = [&](int64_t word_start,
                                      int64_t word_end) __attribute__((noinline)) {
      foreign_bytes.insert(foreign_bytes.end(), bytes + word_start, bytes + word_end);
      tok.push_back(static_cast<uint64_t>(foreign_offsets.size() - 1));
      foreign_offsets.push_back(static_cast<int64_t>(foreign_bytes.size()));
      foreign.push_back(1);
    };
#define GRISTMILL_END_WORD(word_end)                                \
  if (is_foreign) {                                                 \
    end_foreign_word(word_start, word_end);                         \
  } else if (len > 0) {                                             \
    tok.push_back(fmix64(acc ^ (static_cast<uint64_t>(len) * m65))); \
    foreign.push_back(0);                                           \
  }                                                                 \
  acc = 0;                                                          \
  len = 0;                                                          \
  is_foreign = false
    const uint64_t m64 = m[64], m65 = m[65];
    for (int64_t r = 0; r < n_docs; ++r) {
      const int64_t before = static_cast<int64_t>(tok.size());
      uint64_t acc = 0;
      int64_t len = 0, word_start = off[r];
      bool is_foreign = false;
      for (int64_t p = off[r]; p < off[r + 1];) {
        const uint8_t c = bytes[p];
        if (c < 128) {
          const int16_t v = map[c];
          if (v >= 0) {
            acc += (static_cast<uint64_t>(v) + 1) * m[len & 63] +
                   static_cast<uint64_t>(len >> 6) * m64;
            ++len;
          } else if (v == -1) {
            GRISTMILL_END_WORD(p);
            word_start = p + 1;
          }
          ++p;
          continue;
        }
        // one UTF-8 sequence: a space ends the word, anything else makes it foreign
        const int64_t n = c >= 0xF0 ? 4 : c >= 0xE0 ? 3 : c >= 0xC0 ? 2 : 1;
        // a stray continuation byte (invalid UTF-8) is no code point, so no space
        uint32_t cp = n == 4 ? c & 0x07u : n == 3 ? c & 0x0Fu : n == 2 ? c & 0x1Fu : 0x7FFFFFFFu;
        for (int64_t q = 1; q < n && p + q < off[r + 1]; ++q) {
          cp = (cp << 6) | (bytes[p + q] & 0x3Fu);
        }
        const int64_t next = std::min(p + n, off[r + 1]);
        if (std::binary_search(sp, sp + n_spaces, cp)) {
          GRISTMILL_END_WORD(p);
          word_start = next;
        } else {
          is_foreign = true;
        }
        p = next;
      }
      GRISTMILL_END_WORD(off[r + 1]);
      counts[r] = static_cast<int64_t>(tok.size()) - before;
    }
#undef GRISTMILL_END_WORD
  }
  py::array_t<uint64_t> tok_out(static_cast<py::ssize_t>(tok.size()));
  py::array_t<bool> foreign_out(static_cast<py::ssize_t>(foreign.size()));
  py::array_t<int64_t> counts_out(n_docs);
  py::array_t<int64_t> offsets_out(static_cast<py::ssize_t>(foreign_offsets.size()));
  py::array_t<uint8_t> bytes_out(static_cast<py::ssize_t>(foreign_bytes.size()));
  std::memcpy(tok_out.mutable_data(), tok.data(), tok.size() * sizeof(uint64_t));
  std::memcpy(foreign_out.mutable_data(), foreign.data(), foreign.size());
  std::memcpy(counts_out.mutable_data(), counts.data(), counts.size() * sizeof(int64_t));
  std::memcpy(offsets_out.mutable_data(), foreign_offsets.data(),
              foreign_offsets.size() * sizeof(int64_t));
  std::memcpy(bytes_out.mutable_data(), foreign_bytes.data(), foreign_bytes.size());
  return py::make_tuple(tok_out, foreign_out, counts_out, offsets_out, bytes_out);
}

// word_ngrams puts the foreign words' hashes in place (dropping those that
// normalized to nothing, `foreign_keep` 0) and hashes the n-grams of each record's
// words: fmix64(sum_t tok_t * M[66 + t mod 60]), a record with fewer than n words
// giving one shingle of all of them; the shingle is the upper 32 bits. Order:
// records with >= n words, then the shorter ones, as the numpy code has it.
py::tuple word_ngrams(const U64& tokens, const py::array_t<bool>& foreign, const I64& counts,
                      const U64& foreign_hash, const py::array_t<bool>& foreign_keep,
                      const U64& mult, int64_t ngram) {
  const int64_t n_tok = tokens.size(), n_docs = counts.size(), n_foreign = foreign_hash.size();
  if (foreign.size() != n_tok || foreign_keep.size() != n_foreign || mult.size() != 128 ||
      ngram < 1 || ngram > 60) {
    throw std::invalid_argument("length mismatch, or ngram outside 1..60");
  }
  int64_t total = 0;
  for (int64_t r = 0; r < n_docs; ++r) total += counts.data()[r];
  if (total != n_tok) throw std::invalid_argument("counts do not add up to the tokens");
  for (int64_t i = 0; i < n_tok; ++i) {
    if (foreign.data()[i] && tokens.data()[i] >= static_cast<uint64_t>(n_foreign)) {
      throw std::out_of_range("foreign word index out of range");
    }
  }
  // a record has at most as many shingles as words: write in place, cut at the end
  std::vector<uint32_t> hs(n_tok), short_hs;
  std::vector<int64_t> ds(n_tok), short_ds;
  int64_t w = 0;
  {
    py::gil_scoped_release nogil;
    const uint64_t* t_in = tokens.data();
    const bool* is_foreign = foreign.data();
    const uint64_t* fh = foreign_hash.data();
    const bool* keep = foreign_keep.data();
    const uint64_t* m = mult.data();
    uint64_t slot[60];  // the multiplier of each n-gram position
    for (int64_t t = 0; t < ngram; ++t) slot[t] = m[66 + t % 60];
    std::vector<uint64_t> tok;
    for (int64_t r = 0, i0 = 0; r < n_docs; i0 += counts.data()[r], ++r) {
      tok.clear();
      for (int64_t i = i0; i < i0 + counts.data()[r]; ++i) {
        if (!is_foreign[i]) {
          tok.push_back(t_in[i]);
        } else if (keep[t_in[i]]) {
          tok.push_back(fh[t_in[i]]);
        }
      }
      const int64_t count = static_cast<int64_t>(tok.size());
      if (count >= ngram) {
        for (int64_t i = 0; i + ngram <= count; ++i) {
          uint64_t s = 0;
          for (int64_t t = 0; t < ngram; ++t) s += tok[i + t] * slot[t];
          hs[w] = static_cast<uint32_t>(fmix64(s) >> 32);
          ds[w++] = r;
        }
      } else if (count > 0) {
        uint64_t s = 0;
        for (int64_t t = 0; t < count; ++t) s += tok[t] * slot[t];
        short_hs.push_back(static_cast<uint32_t>(fmix64(s) >> 32));
        short_ds.push_back(r);
      }
    }
    std::copy(short_hs.begin(), short_hs.end(), hs.begin() + w);
    std::copy(short_ds.begin(), short_ds.end(), ds.begin() + w);
    w += static_cast<int64_t>(short_hs.size());
  }
  py::array_t<uint32_t> h_out(w);
  py::array_t<int64_t> d_out(w);
  std::memcpy(h_out.mutable_data(), hs.data(), w * sizeof(uint32_t));
  std::memcpy(d_out.mutable_data(), ds.data(), w * sizeof(int64_t));
  return py::make_tuple(h_out, d_out);
}

// key = fmix64(sum_r (sig_r + 1) * row_mult_r + band * band_mult), one per (record, band).
py::array_t<uint64_t> band_keys(const U64& sig, int64_t bands, int64_t rows, const U64& row_mult,
                                uint64_t band_mult) {
  if (sig.ndim() != 2 || bands * rows > sig.shape(1) || row_mult.size() != rows) {
    throw std::invalid_argument("sig must be (records, >= bands * rows), row_mult rows long");
  }
  const int64_t n = sig.shape(0), k = sig.shape(1);
  py::array_t<uint64_t> out({n, bands});
  uint64_t* keys = out.mutable_data();
  {
    py::gil_scoped_release nogil;
    const uint64_t* s = sig.data();
    const uint64_t* rm = row_mult.data();
    for (int64_t i = 0; i < n; ++i) {
      for (int64_t band = 0; band < bands; ++band) {
        const uint64_t* x = s + i * k + band * rows;
        uint64_t acc = 0;
        for (int64_t r = 0; r < rows; ++r) acc += (x[r] + 1) * rm[r];
        keys[i * bands + band] = fmix64(acc + static_cast<uint64_t>(band) * band_mult);
      }
    }
  }
  return out;
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("affine32_signatures", &affine32_signatures, "datasketch affine32 MinHash",
        py::arg("h"), py::arg("docs"), py::arg("n_docs"), py::arg("a"), py::arg("b"),
        py::arg("isa") = "auto");
  m.def("legacy_signatures", &legacy_signatures, "datasketch legacy (mersenne) MinHash",
        py::arg("h"), py::arg("docs"), py::arg("n_docs"), py::arg("a"), py::arg("b"),
        py::arg("isa") = "auto");
  m.def("one_permutation_signatures", &one_permutation_signatures,
        "one permutation hashing with optimal densification");
  m.def("word_tokens", &word_tokens, "words of texts: hashes, and the non-ASCII words");
  m.def("word_ngrams", &word_ngrams, "word n-gram shingle hashes from word_tokens");
  m.def("band_keys", &band_keys, "LSH band keys");
  m.def("pick_isa", &pick_isa, "which copy of the signature loops runs for `want`",
        py::arg("want") = "auto");
}
