// CPU kernels for decode-sized steps (a few tokens), fp32, one C call per projection.
//
// Why they exist: at 1-16 tokens a projection's matmul reads every weight once and does a handful of FMAs per
// weight, so the cost is how well one core streams the weight through its FMA units. The BLAS calls torch makes
// (MKL, oneDNN) are tuned for larger M; on SmolLM2's shapes this kernel takes about 28 ms per 8-token step where
// oneDNN's packed matmul takes 40-50 ms (benchmarks/cpu_engine.py). The LoRA side replaces ~8 small torch ops per
// projection (shrink, mask, expands, influence norms) with one pass over each token's own adapter rows.
//
// Built on first use by kernels/native_cpu.py with the host compiler (-O3 -march=native); plain C ABI for ctypes.
// GCC/Clang vector extensions let the compiler pick the host's widest registers (AVX-512 here, AVX2 or NEON
// elsewhere) without intrinsics.

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

typedef float vec __attribute__((vector_size(64), aligned(4)));  // 16 floats; unaligned loads allowed
static const int VW = 16;           // floats per vec
static const int NV = 3;            // vecs per panel row: 3 x 16 = 48 output columns per panel
static const int NW = VW * NV;      // panel width
static const int MR = 8;            // tokens per register block: 8 x 3 accumulators + 3 weight vecs fit 32 regs

// One panel (NW output columns) for `mr` tokens. xt: the tokens' inputs transposed, [K][mr].
// wp: the panel, [K][NW]. y: the first output column of the panel for token 0, row stride ldy.
template <int R>
static void panel(const float* __restrict xt, const float* __restrict wp, long K, float* __restrict y, long ldy,
                  int ncols, const float* __restrict bias) {
  vec acc[R][NV];
  for (int m = 0; m < R; ++m)
    for (int j = 0; j < NV; ++j) acc[m][j] = (vec){};
  for (long k = 0; k < K; ++k) {
    const float* w = wp + k * NW;
    __builtin_prefetch(w + 16 * NW, 0, 0);  // a few rows ahead: the weight streams from DRAM once per step
    vec w0 = *(const vec*)(w), w1 = *(const vec*)(w + VW), w2 = *(const vec*)(w + 2 * VW);
#pragma GCC unroll 8
    for (int m = 0; m < R; ++m) {
      float xv = xt[k * R + m];
      acc[m][0] += xv * w0;
      acc[m][1] += xv * w1;
      acc[m][2] += xv * w2;
    }
  }
  float tmp[NW];
  for (int m = 0; m < R; ++m) {
    for (int j = 0; j < NV; ++j) *(vec*)(tmp + VW * j) = acc[m][j];
    if (bias)
      for (int c = 0; c < ncols; ++c) tmp[c] += bias[c];
    memcpy(y + m * ldy, tmp, sizeof(float) * ncols);
  }
}

static void panel_any(int r, const float* xt, const float* wp, long K, float* y, long ldy, int ncols,
                      const float* bias) {
  switch (r) {
    case 1: panel<1>(xt, wp, K, y, ldy, ncols, bias); break;
    case 2: panel<2>(xt, wp, K, y, ldy, ncols, bias); break;
    case 3: panel<3>(xt, wp, K, y, ldy, ncols, bias); break;
    case 4: panel<4>(xt, wp, K, y, ldy, ncols, bias); break;
    case 5: panel<5>(xt, wp, K, y, ldy, ncols, bias); break;
    case 6: panel<6>(xt, wp, K, y, ldy, ncols, bias); break;
    case 7: panel<7>(xt, wp, K, y, ldy, ncols, bias); break;
    default: panel<8>(xt, wp, K, y, ldy, ncols, bias); break;
  }
}

typedef float vec8 __attribute__((vector_size(32), aligned(4)));
typedef float vec4 __attribute__((vector_size(16), aligned(4)));
typedef int32_t ivec __attribute__((vector_size(64), aligned(4)));

static inline float hsum(vec v) {  // a shuffle tree, not 16 dependent scalar adds
  vec8 a = __builtin_shufflevector(v, v, 0, 1, 2, 3, 4, 5, 6, 7) +
           __builtin_shufflevector(v, v, 8, 9, 10, 11, 12, 13, 14, 15);
  vec4 b = __builtin_shufflevector(a, a, 0, 1, 2, 3) + __builtin_shufflevector(a, a, 4, 5, 6, 7);
  return (b[0] + b[2]) + (b[1] + b[3]);
}

static inline float dot(const float* __restrict a, const float* __restrict b, long n) {
  // four independent accumulators: one would chain every FMA on the previous one's latency
  vec acc0 = (vec){}, acc1 = (vec){}, acc2 = (vec){}, acc3 = (vec){};
  long i = 0;
  for (; i + 4 * VW <= n; i += 4 * VW) {
    acc0 += *(const vec*)(a + i) * *(const vec*)(b + i);
    acc1 += *(const vec*)(a + i + VW) * *(const vec*)(b + i + VW);
    acc2 += *(const vec*)(a + i + 2 * VW) * *(const vec*)(b + i + 2 * VW);
    acc3 += *(const vec*)(a + i + 3 * VW) * *(const vec*)(b + i + 3 * VW);
  }
  for (; i + VW <= n; i += VW) acc0 += *(const vec*)(a + i) * *(const vec*)(b + i);
  float s = hsum((acc0 + acc1) + (acc2 + acc3));
  for (; i < n; ++i) s += a[i] * b[i];
  return s;
}

// exp(x) for 16 lanes: 2^n * p(r) with x = n ln2 + r, |r| <= ln2/2, p a degree-6 Taylor polynomial (relative
// error < 2e-7, about float rounding); below -87 it returns 0, above 88 it saturates at exp(88) (no inf).
static inline vec vexp(vec x) {
  const vec lo = (vec){} - 87.0f, hi = (vec){} + 88.0f;
  x = x < lo ? lo : x;
  x = x > hi ? hi : x;
  const float magic = 12582912.0f;  // 1.5 * 2^23: adding it rounds to an integer
  vec n = (x * 1.44269504f + magic) - magic;
  vec r = x - n * 0.693145752f - n * 1.42860677e-6f;  // ln2 split in two for an exact n * ln2_hi
  vec p = 1.0f + r * (1.0f + r * (0.5f + r * (1.0f / 6 + r * (1.0f / 24 + r * (1.0f / 120 + r * (1.0f / 720))))));
  ivec e = (__builtin_convertvector(n, ivec) + 127) << 23;
  vec scale;
  memcpy(&scale, &e, sizeof scale);
  vec y = p * scale;
  return x <= lo ? (vec){} : y;
}

static inline void axpy(float h, const float* __restrict b, float* __restrict y, long n) {
  long i = 0;
  for (; i + VW <= n; i += VW) *(vec*)(y + i) += h * *(const vec*)(b + i);
  for (; i < n; ++i) y[i] += h * b[i];
}

static inline float sumsq(const float* a, long n) { return dot(a, a, n); }

// softmax over each of the group's `group` rows of p [group][L], in place
static void softmax_rows(float* p, int group, long L) {
  for (int j = 0; j < group; ++j) {
    float* pj = p + j * L;
    float mx = -INFINITY;
    for (long n = 0; n < L; ++n) mx = std::fmax(mx, pj[n]);
    long n = 0;
    vec vs = (vec){};
    for (; n + VW <= L; n += VW) {
      vec e = vexp(*(vec*)(pj + n) - mx);
      *(vec*)(pj + n) = e;
      vs += e;
    }
    float sum = hsum(vs);
    for (; n < L; ++n) sum += (pj[n] = std::exp(pj[n] - mx));
    const float inv = 1.f / sum;
    for (n = 0; n < L; ++n) pj[n] *= inv;
  }
}

typedef void (*attend_t)(const float*, int, int, const float*, const float*, const int32_t*, long, long, int, long,
                         float, float*, float*);

// One kv head g of one sequence: its `group` query heads q [group][D] against the L cached keys and values
// (row floats per cached token), through the block table; p: scratch [group][L]; o: [group][D] output.
// DV = D / 16 vectors per head row, held in registers; DV = 0 is the generic loop for any D.
template <int DV>
static void attend(const float* q, int group, int D, const float* k_cache, const float* v_cache,
                   const int32_t* table, long bs, long row, int g, long L, float scale, float* p, float* o) {
  auto at = [&](const float* cache, long n) { return cache + ((long)table[n / bs] * bs + n % bs) * row + (long)g * D; };
  for (int j = 0; j < group; ++j) {
    const float* qj = q + (long)j * D;
    if constexpr (DV > 0) {
      vec qv[DV];
      for (int c = 0; c < DV; ++c) qv[c] = *(const vec*)(qj + VW * c);
      for (long n = 0; n < L; ++n) {
        const float* kr = at(k_cache, n);
        vec acc = qv[0] * *(const vec*)kr;
        for (int c = 1; c < DV; ++c) acc += qv[c] * *(const vec*)(kr + VW * c);
        p[j * L + n] = scale * hsum(acc);
      }
    } else {
      for (long n = 0; n < L; ++n) p[j * L + n] = scale * dot(qj, at(k_cache, n), D);
    }
  }
  softmax_rows(p, group, L);
  for (int j = 0; j < group; ++j) {
    float* oj = o + (long)j * D;
    const float* pj = p + j * L;
    if constexpr (DV > 0) {
      vec acc[DV];
      for (int c = 0; c < DV; ++c) acc[c] = (vec){};
      for (long n = 0; n < L; ++n) {
        const float* vr = at(v_cache, n);
        for (int c = 0; c < DV; ++c) acc[c] += pj[n] * *(const vec*)(vr + VW * c);
      }
      for (int c = 0; c < DV; ++c) *(vec*)(oj + VW * c) = acc[c];
    } else {
      std::fill(oj, oj + D, 0.f);
      for (long n = 0; n < L; ++n) axpy(pj[n], at(v_cache, n), oj, D);
    }
  }
}

static attend_t pick_attend(int D) {
  switch (D) {
    case 16: return attend<1>;
    case 32: return attend<2>;
    case 64: return attend<4>;
    case 128: return attend<8>;
    case 256: return attend<16>;
    default: return attend<0>;
  }
}

extern "C" {

// Floats of the packed form of a weight [N, K].
long ol_pack_size(long N, long K) { return ((N + NW - 1) / NW) * K * NW; }

// w [N, K] with strides (sw0, sw1) -> out: panels of NW output columns, each [K][NW], zero-padded past N.
void ol_pack(const float* w, long N, long K, long sw0, long sw1, float* out) {
  long np = (N + NW - 1) / NW;
  for (long p = 0; p < np; ++p)
    for (long k = 0; k < K; ++k)
      for (int c = 0; c < NW; ++c) {
        long n = p * NW + c;
        out[(p * K + k) * NW + c] = n < N ? w[n * sw0 + k * sw1] : 0.f;
      }
}

// y[M, N] (row stride ldy) = x[M, K] (row stride ldx) @ W.T + bias, W given packed (ol_pack). Any M works; the
// weight is read from memory once per call for up to MR tokens and from cache for each further block of MR.
void ol_gemm(const float* x, long M, long K, long ldx, const float* wp, long N, const float* bias, float* y,
             long ldy, int threads) {
  long nblk = (M + MR - 1) / MR;
  std::vector<float> xt(nblk * MR * K);
  for (long b = 0; b < nblk; ++b) {
    int r = (int)(M - b * MR < MR ? M - b * MR : MR);
    float* dst = xt.data() + b * MR * K;
    for (long k = 0; k < K; ++k)
      for (int m = 0; m < r; ++m) dst[k * r + m] = x[(b * MR + m) * ldx + k];
  }
  long np = (N + NW - 1) / NW;
#pragma omp parallel for num_threads(threads) schedule(static) if (threads > 1)
  for (long p = 0; p < np; ++p) {
    int ncols = (int)(N - p * NW < NW ? N - p * NW : NW);
    for (long b = 0; b < nblk; ++b) {
      int r = (int)(M - b * MR < MR ? M - b * MR : MR);
      panel_any(r, xt.data() + b * MR * K, wp + p * K * NW, K, y + b * MR * ldy + p * NW, ldy, ncols,
                bias ? bias + p * NW : nullptr);
    }
  }
}

// LoRA over a projection's live adapter rows (kernels.lora.LiveRows), for each token its own slot's rows only:
//   for each slice i and each row k of slot s = token_slot[t] in [bound0[i], bound1[i]):
//     h = scale[s] * (a[k] . x[t]);  y[t, col[i] : col[i] + width[i]] += h * bt_i[k - bound0[i]]
// a: [R, K] row-major; bt[i]: [bound1[i] - bound0[i], width[i]] row-major; row_slot: [R].
// Tokens with slot < 0 are left alone. With infl_sum (a [M] float32 buffer), each token also adds
// |delta| / max(|y before the delta|, 1e-6), norms over the whole row of y (ldy wide, `ncols_y` used), as the
// reference does (engine/layers/linear.py).
void ol_lora(const float* x, long M, long K, long ldx, const int32_t* token_slot, const float* a,
             const int32_t* row_slot, int nslices, const int64_t* bound0, const int64_t* bound1,
             const float* const* bt, const int64_t* col, const int64_t* width, const float* scale, float* y,
             long ldy, long ncols_y, float* infl_sum) {
  long wmax = 0;
  for (int i = 0; i < nslices; ++i) wmax = width[i] > wmax ? width[i] : wmax;
  // tokens grouped by slot (stable), so that each adapter row is read from memory once per call and then
  // from cache for the group's other tokens: reading it once per token cost several times more
  std::vector<long> order;
  order.reserve(M);
  for (long t = 0; t < M; ++t)
    if (token_slot[t] >= 0) order.push_back(t);
  std::stable_sort(order.begin(), order.end(), [&](long u, long v) { return token_slot[u] < token_slot[v]; });
  std::vector<float> yn2(infl_sum ? M : 0), dn2(infl_sum ? M : 0, 0.f), h(M);
  std::vector<float> delta(infl_sum ? M * wmax : 0);
  if (infl_sum)
    for (long t : order) yn2[t] = sumsq(y + t * ldy, ncols_y);  // the base output, before any delta
  std::vector<float> hs;
  for (size_t g0 = 0; g0 < order.size();) {
    const int s = token_slot[order[g0]];
    size_t g1 = g0;
    while (g1 < order.size() && token_slot[order[g1]] == s) ++g1;
    for (int i = 0; i < nslices; ++i) {
      // this slot's rows of the slice: contiguous, as kernels.lora.live_rows gathers them
      long k0 = bound0[i];
      while (k0 < bound1[i] && row_slot[k0] != s) ++k0;
      long k1 = k0;
      while (k1 < bound1[i] && row_slot[k1] == s) ++k1;
      if (k1 == k0) continue;
      const long nr = k1 - k0, w = width[i];
      const float* b0 = bt[i] + (k0 - bound0[i]) * w;  // [nr, w]
      hs.resize((g1 - g0) * nr);
      for (size_t g = g0; g < g1; ++g)  // shrink: h = scale * A x, each A row read once for the group
        for (long j = 0; j < nr; ++j) hs[(g - g0) * nr + j] = scale[s] * dot(a + (k0 + j) * K, x + order[g] * ldx, K);
      for (size_t g = g0; g < g1; ++g) {  // expand: each output vector loaded and stored once per token
        const float* hg = hs.data() + (g - g0) * nr;
        float* yr = y + order[g] * ldy + col[i];
        float* dst = infl_sum ? delta.data() + g * wmax : yr;
        long n = 0;
        for (; n + VW <= w; n += VW) {
          vec acc = infl_sum ? (vec){} : *(vec*)(dst + n);
          for (long j = 0; j < nr; ++j) acc += hg[j] * *(const vec*)(b0 + j * w + n);
          *(vec*)(dst + n) = acc;
        }
        for (; n < w; ++n) {
          float acc = infl_sum ? 0.f : dst[n];
          for (long j = 0; j < nr; ++j) acc += hg[j] * b0[j * w + n];
          dst[n] = acc;
        }
        if (infl_sum) {
          dn2[order[g]] += sumsq(dst, w);
          axpy(1.f, dst, yr, w);
        }
      }
    }
    g0 = g1;
  }
  if (infl_sum)
    for (long t : order) infl_sum[t] += std::sqrt(dn2[t]) / std::fmax(std::sqrt(yn2[t]), 1e-6f);
}

// One attention layer of a pure-decode step (one query token per sequence), from the fused qkv projection's
// output: rotate q and k (Llama's rotate-half RoPE with the step's cos/sin rows), write k and v into the
// paged cache at the token's slot (slot < 0: padding, not written), then attend over the sequence's
// context through its block table. Replaces ~15 small torch ops per layer (split, rotary, two index_copy_,
// two gathers, SDPA) with one pass that reads each cached key and value once.
//   qkv [T, (H + 2 Hkv) D] (row stride ldqkv); cos, sin [T, D]; caches [blocks, block_size, Hkv, D];
//   block_tables [T, max_blocks]; seq_lens [T] (context length including this token); out [T, H D].
void ol_decode_attention(const float* qkv, long T, long ldqkv, int H, int Hkv, int D, const float* cos,
                         const float* sin, float* k_cache, float* v_cache, long block_size, const int64_t* slots,
                         const int32_t* block_tables, long max_blocks, const int32_t* seq_lens, float scale,
                         float* out, int threads) {
  const int half = D / 2, group = H / Hkv;
  const long row = (long)Hkv * D;  // floats per cached token
  const attend_t attend_fn = pick_attend(D);
#pragma omp parallel for num_threads(threads) schedule(dynamic) if (threads > 1)
  for (long t = 0; t < T; ++t) {
    const float* src = qkv + t * ldqkv;
    const float* c = cos + t * D;
    const float* sn = sin + t * D;
    std::vector<float> q((size_t)H * D);
    auto rotate = [&](const float* x, float* y) {
      for (int i = 0; i < half; ++i) {
        float x1 = x[i], x2 = x[i + half];
        y[i] = x1 * c[i] - x2 * sn[i];
        y[i + half] = x2 * c[i + half] + x1 * sn[i + half];
      }
    };
    for (int h = 0; h < H; ++h) rotate(src + (long)h * D, q.data() + (long)h * D);
    if (slots[t] >= 0) {
      float* kd = k_cache + slots[t] * row;
      for (int g = 0; g < Hkv; ++g) rotate(src + (long)(H + g) * D, kd + (long)g * D);
      memcpy(v_cache + slots[t] * row, src + (long)(H + Hkv) * D, sizeof(float) * row);
    }
    const long L = seq_lens[t];
    const int32_t* table = block_tables + t * max_blocks;
    std::vector<float> p((size_t)group * L);
    for (int g = 0; g < Hkv; ++g) {
      attend_fn(q.data() + (long)g * group * D, group, D, k_cache, v_cache, table, block_size, row, g, L, scale,
                p.data(), out + t * (long)H * D + (long)g * group * D);
    }
  }
}

// ---- one whole decoder layer of a decode step (Llama family), one call ----------------------------------------

struct OlLora {  // a projection's live adapter rows (see ol_lora); a == nullptr: no LoRA on this projection
  const float* a;
  const int32_t* row_slot;
  int nslices;
  const int64_t* bound0;
  const int64_t* bound1;
  const float* const* bt;
  const int64_t* col;
  const int64_t* width;
};

struct OlProj {  // a projection: panel-packed weight [n, k] (ol_pack), optional bias [n], optional LoRA
  const float* wp;
  long n, k;
  const float* bias;
  OlLora lora;
};

struct OlLayer {
  const float* norm1;  // input_layernorm weight [hidden]
  const float* norm2;  // post_attention_layernorm weight [hidden]
  float eps;
  OlProj qkv, o, gate_up, down;
  float* k_cache;
  float* v_cache;
};

struct OlStep {
  long T, hidden, inter;
  int H, Hkv, D;
  long block_size, max_blocks;
  float scale;
  const float* cos;
  const float* sin;
  const int64_t* slots;
  const int32_t* block_tables;
  const int32_t* seq_lens;
  const int32_t* token_slot;  // nullptr: no LoRA this step
  const float* lora_scale;
  float* infl_sum;  // nullptr: no influence statistics
  int threads;
};

// res += hs; x = rmsnorm(res) * w  (Llama's fused residual add + RMSNorm, statistics in float32)
static void add_norm(float* hs, float* res, const float* w, float eps, long T, long n, float* x) {
  for (long t = 0; t < T; ++t) {
    float* r = res + t * n;
    axpy(1.f, hs + t * n, r, n);
    const float inv = 1.f / std::sqrt(sumsq(r, n) / (float)n + eps);
    for (long i = 0; i < n; ++i) x[t * n + i] = (r[i] * inv) * w[i];
  }
}

static void project(const OlProj& p, const OlStep& S, const float* x, float* y) {
  ol_gemm(x, S.T, p.k, p.k, p.wp, p.n, p.bias, y, p.n, S.threads);
  if (S.token_slot && p.lora.a)
    ol_lora(x, S.T, p.k, p.k, S.token_slot, p.lora.a, p.lora.row_slot, p.lora.nslices, p.lora.bound0,
            p.lora.bound1, p.lora.bt, p.lora.col, p.lora.width, S.lora_scale, y, p.n, p.n, S.infl_sum);
}

// hs [T, hidden]: the previous layer's output (in), this layer's MLP output (out); res [T, hidden]: the
// residual stream (zeros before the first layer: 0 + h is h). The same steps as LlamaDecoderLayer.forward.
void ol_layer(const OlLayer* L, const OlStep* S, float* hs, float* res) {
  const long T = S->T, hid = S->hidden, inter = S->inter;
  std::vector<float> x(T * hid), qkv(T * L->qkv.n), ao(T * (long)S->H * S->D), gu(T * 2 * inter), act(T * inter);
  add_norm(hs, res, L->norm1, L->eps, T, hid, x.data());
  project(L->qkv, *S, x.data(), qkv.data());
  ol_decode_attention(qkv.data(), T, L->qkv.n, S->H, S->Hkv, S->D, S->cos, S->sin, L->k_cache, L->v_cache,
                      S->block_size, S->slots, S->block_tables, S->max_blocks, S->seq_lens, S->scale, ao.data(),
                      S->threads);
  project(L->o, *S, ao.data(), hs);
  add_norm(hs, res, L->norm2, L->eps, T, hid, x.data());
  project(L->gate_up, *S, x.data(), gu.data());
  for (long t = 0; t < T; ++t) {  // silu(gate) * up
    const float* g = gu.data() + t * 2 * inter;
    const float* u = g + inter;
    float* o = act.data() + t * inter;
    long i = 0;
    for (; i + VW <= inter; i += VW) {
      vec gv = *(const vec*)(g + i);
      *(vec*)(o + i) = gv / (1.f + vexp(-gv)) * *(const vec*)(u + i);
    }
    for (; i < inter; ++i) o[i] = g[i] / (1.f + std::exp(-g[i])) * u[i];
  }
  project(L->down, *S, act.data(), hs);
}

}  // extern "C"
