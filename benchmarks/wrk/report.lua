-- Appended to every wrk script by benchmarks/run.py: prints one machine-readable line at the end.
-- Latencies are in microseconds; errors.status counts responses with a status above 399.
done = function(summary, latency, requests)
   local e = summary.errors
   io.write(string.format(
      "FASTFPM_BENCH {\"requests\":%d,\"duration_us\":%d,\"bytes\":%d," ..
      "\"connect\":%d,\"read\":%d,\"write\":%d,\"status\":%d,\"timeout\":%d," ..
      "\"p50\":%d,\"p90\":%d,\"p99\":%d,\"p999\":%d,\"mean\":%.1f,\"max\":%d}\n",
      summary.requests, summary.duration, summary.bytes,
      e.connect, e.read, e.write, e.status, e.timeout,
      latency:percentile(50), latency:percentile(90), latency:percentile(99),
      latency:percentile(99.9), latency.mean, latency.max))
end
