// The Go peer of W4 (bench/w4_pool.c): 200,000 tasks of about 1 us of CPU
// each, their results collected; ns per task, peak RSS and peak threads.
//
// Usage: w4 all|outstanding <work_iters>
//
//	all          10 worker goroutines take task numbers from a channel with
//	             room for all N, which the main goroutine fills (inside the
//	             timed part); each worker stores its result in the task's
//	             slot; the main goroutine waits for all (sync.WaitGroup) and
//	             reads them.
//	outstanding  the shape of libcaller's system: at most 10 tasks
//	             outstanding, each a goroutine of its own (`go`), results
//	             consumed in completion order from a channel, the next task
//	             started as each result is taken.
//
// The task is w4_pool.c's work(): work_iters dependent 64-bit multiply-adds
// (an LCG step), work_iters as calibrated there and passed on the command
// line, so both programs do the same work per task.
//
// Prints one line: ns_per_task=<f> peak_rss_mib=<f> threads=<n> chk=<n>
// (peak RSS: getrusage ru_maxrss; threads: /proc/self/task, sampled 20 times
// during the run and once at its end, the maximum). GOMAXPROCS is the
// environment's (bench-w4_pool sets 2 unless it is set).
package main

import (
	"fmt"
	"os"
	"strconv"
	"sync"
	"sync/atomic"
	"syscall"
	"time"
)

const (
	n           = 200000
	concurrency = 10
	sampleEvery = n / 20
)

var workIters int

// work is w4_pool.c's work(). Go does not fold this loop: each step depends
// on the one before, and the result is used.
func work(x uint64, iters int) uint64 {
	for i := 0; i < iters; i++ {
		x = x*6364136223846793005 + 1442695040888963407
	}
	return x
}

func threadsNow() int32 {
	d, err := os.Open("/proc/self/task")
	if err != nil {
		return -1
	}
	defer d.Close()
	names, err := d.Readdirnames(-1)
	if err != nil {
		return -1
	}
	return int32(len(names))
}

var peakThreads int32

func sampleThreads() {
	t := threadsNow()
	for {
		p := atomic.LoadInt32(&peakThreads)
		if t <= p || atomic.CompareAndSwapInt32(&peakThreads, p, t) {
			return
		}
	}
}

// all: every task submitted at once to 10 worker goroutines.
func all() uint64 {
	res := make([]uint64, n)
	tasks := make(chan int, n)
	var wg sync.WaitGroup
	wg.Add(concurrency)
	for w := 0; w < concurrency; w++ {
		go func() {
			defer wg.Done()
			for i := range tasks {
				res[i] = work(uint64(i), workIters)
				if i%sampleEvery == 0 {
					sampleThreads()
				}
			}
		}()
	}
	for i := 0; i < n; i++ {
		tasks <- i
	}
	close(tasks)
	wg.Wait()
	var sum uint64
	for _, r := range res {
		sum += r
	}
	return sum
}

// outstanding: 10 in flight, consumed as they complete, one started per
// completion.
func outstanding() uint64 {
	done := make(chan uint64, concurrency)
	start := func(i int) {
		go func() { done <- work(uint64(i), workIters) }()
	}
	made := 0
	for ; made < concurrency; made++ {
		start(made)
	}
	var sum uint64
	for got := 1; got <= n; got++ {
		sum += <-done
		if got%sampleEvery == 0 || got == 1 {
			sampleThreads()
		}
		if made < n {
			start(made)
			made++
		}
	}
	return sum
}

func main() {
	if len(os.Args) != 3 {
		fmt.Fprintln(os.Stderr, "usage: w4 all|outstanding <work_iters>")
		os.Exit(2)
	}
	iters, err := strconv.Atoi(os.Args[2])
	if err != nil || iters < 1 {
		fmt.Fprintln(os.Stderr, "w4: bad work_iters:", os.Args[2])
		os.Exit(2)
	}
	workIters = iters
	var run func() uint64
	switch os.Args[1] {
	case "all":
		run = all
	case "outstanding":
		run = outstanding
	default:
		fmt.Fprintln(os.Stderr, "w4: unknown mode:", os.Args[1])
		os.Exit(2)
	}

	t0 := time.Now() // carries Go's monotonic clock reading
	sum := run()
	elapsed := time.Since(t0)
	sampleThreads()
	var ru syscall.Rusage
	syscall.Getrusage(syscall.RUSAGE_SELF, &ru)
	ns := float64(elapsed.Nanoseconds()) / n
	fmt.Printf("ns_per_task=%.2f peak_rss_mib=%.3f threads=%d chk=%d\n",
		ns, float64(ru.Maxrss)/1024, atomic.LoadInt32(&peakThreads), sum&0xff)
}
