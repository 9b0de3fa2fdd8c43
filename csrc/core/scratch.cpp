// Copyright (c) mmbhvit contributors. Licensed under the Apache License 2.0.
#include "scratch.h"

#include <cstdint>
#include <new>

namespace mmbhvit {

ScratchStack::~ScratchStack() { delete[] raw_; }

unsigned char* ScratchStack::take(std::size_t bytes) {
  depth_ += bytes;
  if (depth_ > peak_) peak_ = depth_;
  if (top_ == 0 && peak_ > cap_) {
    unsigned char* grown = new (std::nothrow) unsigned char[peak_ + 63];
    if (grown != nullptr) {
      delete[] raw_;
      raw_ = grown;
      const std::uintptr_t at = reinterpret_cast<std::uintptr_t>(grown);
      base_ = grown + ((64 - at % 64) % 64);
      cap_ = peak_;
    }
  }
  if (base_ == nullptr || top_ + bytes > cap_) {
    ++heap_;
    return nullptr;
  }
  unsigned char* p = base_ + top_;
  top_ += bytes;
  return p;
}

void ScratchStack::give(std::size_t bytes, bool stacked) {
  depth_ -= bytes;
  if (stacked) top_ -= bytes;
}

std::size_t ScratchStack::in_use() const { return depth_; }

std::size_t ScratchStack::heap_blocks() const { return heap_; }

ScratchStack& scratch_stack() {
  thread_local ScratchStack stack;
  return stack;
}

}  // namespace mmbhvit
