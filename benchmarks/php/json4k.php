<?php
// The same document as benchmarks/apps.py's json4k: 62 items, 4124 bytes.
$items = [];
for ($i = 0; $i < 62; $i++) {
    $items[] = ['id' => $i, 'name' => sprintf('item-%03d', $i), 'active' => $i % 2 == 0, 'tags' => ['alpha', 'beta']];
}
$body = json_encode(['items' => $items]);
header('Content-Type: application/json');
header('Content-Length: ' . strlen($body));
echo $body;
