// Copyright (c) mmbhvit contributors. Licensed under the Apache License 2.0.
//
// Each thread's memory for the kernels' scratch buffers (Scratch in
// bitpack.h): a stack of 64-byte blocks kept from call to call, so that a
// kernel does not call the allocator once the stack has grown to its needs.
// (With one glibc arena for all threads, which mmbhvit's tools set up on
// CPU machines, a worker thread's malloc waits on the lock of the thread
// that called the op; on a VM whose other vCPU has gone idle that wait
// took milliseconds.) Plain C++, built once (not per kernel set).
#pragma once

#include <cstddef>

namespace mmbhvit {

class ScratchStack {
 public:
  ScratchStack() = default;
  ScratchStack(const ScratchStack&) = delete;
  ScratchStack& operator=(const ScratchStack&) = delete;
  ~ScratchStack();

  // `bytes` (a multiple of 64) from the top of the stack, or nullptr when
  // they do not fit: the caller then allocates them itself. The stack
  // grows, to the deepest use seen so far, only while it is empty.
  unsigned char* take(std::size_t bytes);
  // Gives back the newest block still out (stacked: from take) or records
  // the end of a block the caller allocated itself.
  void give(std::size_t bytes, bool stacked);

  std::size_t in_use() const;      // bytes taken and not given back
  std::size_t heap_blocks() const; // requests that did not fit, ever

 private:
  unsigned char* raw_ = nullptr;   // what new[] returned
  unsigned char* base_ = nullptr;  // raw_ rounded up to 64 bytes
  std::size_t cap_ = 0, top_ = 0;
  std::size_t depth_ = 0;  // stacked + self-allocated blocks still out
  std::size_t peak_ = 0;   // the largest depth_ seen
  std::size_t heap_ = 0;
};

// The calling thread's stack.
ScratchStack& scratch_stack();

}  // namespace mmbhvit
