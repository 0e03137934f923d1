// The dot product of 8 activations with 8 bf16 weights packed in `wv` (element 2i in the low
// half of word i, 2i + 1 in the high half), the activations split into even and odd elements.
fn dot8(even: vec4<f32>, odd: vec4<f32>, wv: vec4<u32>) -> f32 {
    let lo = bitcast<vec4<f32>>(wv << vec4<u32>(16u));
    let hi = bitcast<vec4<f32>>(wv & vec4<u32>(0xffff0000u));
    return dot(even, lo) + dot(odd, hi);
}
