// Small AVX-512 helpers shared by the DeltaNet kernels: lane masks and exp on 16 lanes.
#pragma once
#include <immintrin.h>

#include <cstdint>

namespace qwen35_ggml {

constexpr int64_t kLanes = 16;

// The first `count` of 16 lanes (none for count <= 0).
inline __mmask16 lanes_below(int64_t count) {
  if (count <= 0) return 0;
  return count >= kLanes ? static_cast<__mmask16>(0xFFFF) : static_cast<__mmask16>((1u << count) - 1);
}

// exp on 16 lanes: 2^n exp(r) with |r| <= ln2/2 and a degree-7 Taylor polynomial (error about
// 1 ulp). Arguments below -150 give 0, as they round to in fp32.
inline __m512 exp16(__m512 x) {
  x = _mm512_max_ps(_mm512_min_ps(x, _mm512_set1_ps(88.7f)), _mm512_set1_ps(-150.0f));
  const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504f)),
                                        _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  // ln 2 in two parts, so that r = x - n ln2 keeps its low bits.
  __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693145752f), x);
  r = _mm512_fnmadd_ps(n, _mm512_set1_ps(1.42860677e-6f), r);
  __m512 p = _mm512_set1_ps(1.0f / 5040);
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 720));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 120));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 24));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 6));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(0.5f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f));
  return _mm512_scalef_ps(p, n);
}

// x sigmoid(x) = x / (1 + exp(-x)) on 16 lanes; large negative x gives -0 (exp(-x) saturates).
inline __m512 silu16(__m512 x) {
  const __m512 denominator = _mm512_add_ps(_mm512_set1_ps(1.0f), exp16(_mm512_sub_ps(_mm512_setzero_ps(), x)));
  return _mm512_div_ps(x, denominator);
}

}  // namespace qwen35_ggml
