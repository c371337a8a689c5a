"""
Fakes shipped with the package so that the tests, the benchmarks and
C{--mock-upstream} share them: the fake OpenAI API, the proxy in memory
(L{oaiproxy.fake.harness}) and the real processes for end-to-end runs.
"""
